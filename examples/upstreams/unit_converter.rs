//! `unit-converter`: an example upstream MCP server that converts values
//! between units of the same physical dimension.
//!
//! Tools:
//! * `convert` `{value: number, from: string, to: string}` converts a value.
//!   Unit names are case-insensitive and accept common aliases ("meters",
//!   "celsius", "lbs", ...). Temperatures are converted affinely (C, F, K), all
//!   other dimensions by a factor. On success the result carries a sentence
//!   such as `10 km = 6.21371 mi` (6 significant digits) and structured content
//!   shaped as [`Conversion`]. An unknown unit, units of different dimensions,
//!   a temperature below absolute zero or a result that overflows `f64` give a
//!   tool result with `isError: true` and an explanatory sentence.
//! * `list_units` `{dimension?: string}` lists the supported units, of one
//!   dimension or of all of them, as text and as a [`UnitList`].
//!
//! Both tools are read-only, idempotent and closed-world.

use rmcp::{
    ServerHandler,
    handler::server::{router::tool::ToolRouter, tool::schema_for_output, wrapper::Parameters},
    model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig},
    schemars, tool, tool_handler, tool_router,
};
use serde::{Deserialize, Serialize};

/// A physical dimension; units convert only within one dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dimension {
    Length,
    Mass,
    Temperature,
    Volume,
    Data,
    Time,
    Speed,
}

impl Dimension {
    const ALL: [Dimension; 7] = [
        Dimension::Length,
        Dimension::Mass,
        Dimension::Temperature,
        Dimension::Volume,
        Dimension::Data,
        Dimension::Time,
        Dimension::Speed,
    ];

    fn name(self) -> &'static str {
        match self {
            Dimension::Length => "length",
            Dimension::Mass => "mass",
            Dimension::Temperature => "temperature",
            Dimension::Volume => "volume",
            Dimension::Data => "data",
            Dimension::Time => "time",
            Dimension::Speed => "speed",
        }
    }

    /// Accepts the dimension name or a common synonym, case-insensitively.
    fn parse(input: &str) -> Option<Dimension> {
        let wanted = normalize(input);
        let found = match wanted.as_str() {
            "length" | "distance" => Dimension::Length,
            "mass" | "weight" => Dimension::Mass,
            "temperature" | "temp" => Dimension::Temperature,
            "volume" | "capacity" => Dimension::Volume,
            "data" | "storage" | "information" | "digital storage" | "bytes" => Dimension::Data,
            "time" | "duration" => Dimension::Time,
            "speed" | "velocity" => Dimension::Speed,
            _ => return None,
        };
        Some(found)
    }
}

/// One supported unit. A value `x` in this unit equals `(x + offset) * scale`
/// in the dimension's base unit (m, kg, K, l, B, s, m/s); the offset is only
/// non-zero for the affine temperature scales.
struct Unit {
    symbol: &'static str,
    name: &'static str,
    dimension: Dimension,
    scale: f64,
    offset: f64,
    /// Extra accepted spellings, lower case (the symbol and name are always accepted).
    aliases: &'static [&'static str],
}

const fn unit(
    symbol: &'static str,
    name: &'static str,
    dimension: Dimension,
    scale: f64,
    aliases: &'static [&'static str],
) -> Unit {
    Unit {
        symbol,
        name,
        dimension,
        scale,
        offset: 0.0,
        aliases,
    }
}

use Dimension::{Data, Length, Mass, Speed, Temperature, Time, Volume};

/// Every supported unit, grouped by dimension in `Dimension::ALL` order.
/// Imperial/US factors are the exact legal definitions.
static UNITS: &[Unit] = &[
    // Length, base metre.
    unit(
        "mm",
        "millimetre",
        Length,
        0.001,
        &["millimeter", "millimeters", "millimetres"],
    ),
    unit(
        "cm",
        "centimetre",
        Length,
        0.01,
        &["centimeter", "centimeters", "centimetres"],
    ),
    unit("m", "metre", Length, 1.0, &["meter", "meters", "metres"]),
    unit(
        "km",
        "kilometre",
        Length,
        1000.0,
        &["kilometer", "kilometers", "kilometres"],
    ),
    unit("in", "inch", Length, 0.0254, &["inches", "\""]),
    unit("ft", "foot", Length, 0.3048, &["feet", "'"]),
    unit("yd", "yard", Length, 0.9144, &["yards"]),
    unit("mi", "mile", Length, 1609.344, &["miles"]),
    unit("nmi", "nautical mile", Length, 1852.0, &["nautical miles"]),
    // Mass, base kilogram.
    unit(
        "mg",
        "milligram",
        Mass,
        1e-6,
        &["milligrams", "milligramme", "milligrammes"],
    ),
    unit("g", "gram", Mass, 0.001, &["grams", "gramme", "grammes"]),
    unit("kg", "kilogram", Mass, 1.0, &["kilograms", "kilo", "kilos"]),
    unit(
        "t",
        "tonne",
        Mass,
        1000.0,
        &["tonnes", "metric ton", "metric tons"],
    ),
    unit("oz", "ounce", Mass, 0.028_349_523_125, &["ounces"]),
    unit("lb", "pound", Mass, 0.453_592_37, &["pounds", "lbs"]),
    unit("st", "stone", Mass, 6.350_293_18, &["stones"]),
    // Temperature, base kelvin (affine).
    Unit {
        symbol: "C",
        name: "degree Celsius",
        dimension: Temperature,
        scale: 1.0,
        offset: 273.15,
        aliases: &["celsius", "centigrade", "°c", "degrees celsius", "deg c"],
    },
    Unit {
        symbol: "F",
        name: "degree Fahrenheit",
        dimension: Temperature,
        scale: 5.0 / 9.0,
        offset: 459.67,
        aliases: &["fahrenheit", "°f", "degrees fahrenheit", "deg f"],
    },
    unit("K", "kelvin", Temperature, 1.0, &["kelvins"]),
    // Volume, base litre (US customary units).
    unit(
        "ml",
        "millilitre",
        Volume,
        0.001,
        &["milliliter", "milliliters", "millilitres"],
    ),
    unit("l", "litre", Volume, 1.0, &["liter", "liters", "litres"]),
    unit(
        "m3",
        "cubic metre",
        Volume,
        1000.0,
        &["m³", "m^3", "cubic meter", "cubic meters", "cubic metres"],
    ),
    unit(
        "tsp",
        "US teaspoon",
        Volume,
        0.004_928_921_593_75,
        &["teaspoon", "teaspoons"],
    ),
    unit(
        "tbsp",
        "US tablespoon",
        Volume,
        0.014_786_764_781_25,
        &["tablespoon", "tablespoons"],
    ),
    unit("cup", "US cup", Volume, 0.236_588_236_5, &["cups"]),
    unit("pt", "US pint", Volume, 0.473_176_473, &["pint", "pints"]),
    unit(
        "qt",
        "US quart",
        Volume,
        0.946_352_946,
        &["quart", "quarts"],
    ),
    unit(
        "gal",
        "US gallon",
        Volume,
        3.785_411_784,
        &["gallon", "gallons"],
    ),
    // Data, base byte. KB..TB are SI (powers of 1000), KiB..TiB binary (powers of 1024).
    unit("B", "byte", Data, 1.0, &["bytes"]),
    unit("KB", "kilobyte", Data, 1e3, &["kilobytes"]),
    unit("MB", "megabyte", Data, 1e6, &["megabytes"]),
    unit("GB", "gigabyte", Data, 1e9, &["gigabytes"]),
    unit("TB", "terabyte", Data, 1e12, &["terabytes"]),
    unit("KiB", "kibibyte", Data, 1024.0, &["kibibytes"]),
    unit("MiB", "mebibyte", Data, 1_048_576.0, &["mebibytes"]),
    unit("GiB", "gibibyte", Data, 1_073_741_824.0, &["gibibytes"]),
    unit("TiB", "tebibyte", Data, 1_099_511_627_776.0, &["tebibytes"]),
    // Time, base second.
    unit("ms", "millisecond", Time, 0.001, &["milliseconds", "msec"]),
    unit("s", "second", Time, 1.0, &["seconds", "sec", "secs"]),
    unit("min", "minute", Time, 60.0, &["minutes", "mins"]),
    unit("h", "hour", Time, 3600.0, &["hours", "hr", "hrs"]),
    unit("d", "day", Time, 86_400.0, &["days"]),
    unit("wk", "week", Time, 604_800.0, &["weeks", "w"]),
    // Speed, base metre per second.
    unit(
        "m/s",
        "metre per second",
        Speed,
        1.0,
        &["mps", "meters per second", "metres per second"],
    ),
    unit(
        "km/h",
        "kilometre per hour",
        Speed,
        1.0 / 3.6,
        &[
            "kph",
            "kmh",
            "km/hr",
            "kilometers per hour",
            "kilometres per hour",
        ],
    ),
    unit(
        "mph",
        "mile per hour",
        Speed,
        0.447_04,
        &["mi/h", "miles per hour"],
    ),
    unit(
        "kn",
        "knot",
        Speed,
        1852.0 / 3600.0,
        &["kt", "kts", "knots"],
    ),
];

/// Trims, lower-cases and collapses inner whitespace.
fn normalize(input: &str) -> String {
    input
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn find_unit(input: &str) -> Option<&'static Unit> {
    let wanted = normalize(input);
    UNITS.iter().find(|unit| {
        unit.symbol.to_lowercase() == wanted
            || unit.name.to_lowercase() == wanted
            || unit.aliases.contains(&wanted.as_str())
    })
}

fn symbols_of(dimension: Dimension) -> String {
    UNITS
        .iter()
        .filter(|unit| unit.dimension == dimension)
        .map(|unit| unit.symbol)
        .collect::<Vec<_>>()
        .join(", ")
}

fn all_symbols() -> String {
    Dimension::ALL
        .iter()
        .map(|dimension| format!("{} ({})", dimension.name(), symbols_of(*dimension)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Rounds to `digits` significant digits (non-finite and zero pass through).
fn round_significant(value: f64, digits: usize) -> f64 {
    if value == 0.0 || !value.is_finite() {
        return value;
    }
    format!("{:.*e}", digits.saturating_sub(1), value)
        .parse()
        .unwrap_or(value)
}

/// Formats a number for humans: plain notation for magnitudes in
/// `[1e-6, 1e15)`, scientific notation otherwise.
fn display_number(value: f64) -> String {
    if value == 0.0 {
        return "0".to_owned();
    }
    let magnitude = value.abs();
    if (1e-6..1e15).contains(&magnitude) {
        format!("{value}")
    } else {
        format!("{value:e}")
    }
}

/// Structured content of a successful `convert` call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Conversion {
    /// The input value, in the `from` unit.
    pub value: f64,
    /// Canonical symbol of the source unit, e.g. `km`.
    pub from: String,
    /// Canonical symbol of the target unit, e.g. `mi`.
    pub to: String,
    /// The converted value in the `to` unit, rounded to 12 significant digits
    /// to hide floating-point noise.
    pub result: f64,
    /// The dimension both units measure, e.g. `length`.
    pub dimension: String,
}

/// One unit in a [`UnitList`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UnitInfo {
    /// Canonical symbol, e.g. `km`; this is what `convert` reports.
    pub symbol: String,
    /// Full name, e.g. `kilometre`.
    pub name: String,
    /// Further accepted spellings (all matching is case-insensitive).
    pub aliases: Vec<String>,
}

/// The units of one dimension in a [`UnitList`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DimensionUnits {
    /// Dimension name: `length`, `mass`, `temperature`, `volume`, `data`,
    /// `time` or `speed`.
    pub dimension: String,
    /// The units of this dimension.
    pub units: Vec<UnitInfo>,
}

/// Structured content of a `list_units` call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UnitList {
    /// One entry per listed dimension.
    pub dimensions: Vec<DimensionUnits>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct ConvertArgs {
    /// The number to convert, expressed in the `from` unit.
    value: f64,
    /// Source unit: a symbol (e.g. "km", "F", "MiB", "km/h") or a name/alias
    /// (e.g. "kilometers", "fahrenheit"); case-insensitive.
    from: String,
    /// Target unit, of the same dimension as `from`; same spelling rules.
    to: String,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
struct ListUnitsArgs {
    /// Restrict the list to one dimension: length, mass, temperature, volume,
    /// data, time or speed. Omit to list every dimension.
    #[serde(default)]
    dimension: Option<String>,
}

fn error_result(message: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message.into())])
}

/// Builds a successful result whose text is `text` and whose structured
/// content is `value` serialized.
fn structured_result<T: Serialize>(text: String, value: &T) -> CallToolResult {
    match serde_json::to_value(value) {
        Ok(json) => {
            let mut result = CallToolResult::structured(json);
            result.content = vec![ContentBlock::text(text)];
            result
        }
        Err(error) => error_result(format!("internal error serializing the result: {error}")),
    }
}

fn convert(value: f64, from: &str, to: &str) -> Result<Conversion, String> {
    if !value.is_finite() {
        return Err(format!("The value {value} is not a finite number."));
    }
    let Some(source) = find_unit(from) else {
        return Err(format!(
            "Unknown unit \"{from}\". Supported units: {}. Call list_units for names and aliases.",
            all_symbols()
        ));
    };
    let Some(target) = find_unit(to) else {
        return Err(format!(
            "Unknown unit \"{to}\". Supported units: {}. Call list_units for names and aliases.",
            all_symbols()
        ));
    };
    if source.dimension != target.dimension {
        return Err(format!(
            "Cannot convert {} ({}) to {} ({}): both units must measure the same dimension. Units of {}: {}.",
            source.symbol,
            source.dimension.name(),
            target.symbol,
            target.dimension.name(),
            source.dimension.name(),
            symbols_of(source.dimension),
        ));
    }
    let base = (value + source.offset) * source.scale;
    // Kelvin is the temperature base unit, so a negative base is below absolute zero.
    if source.dimension == Dimension::Temperature && base < -1e-9 {
        let limit = round_significant(-source.offset, 6);
        return Err(format!(
            "{} {} is below absolute zero ({} {}), so it is not a valid temperature.",
            display_number(value),
            source.symbol,
            display_number(limit),
            source.symbol,
        ));
    }
    let scaled = base / target.scale;
    let mut result = scaled - target.offset;
    // Subtracting a temperature offset can leave floating-point residue
    // (32 F -> 5.7e-14 C); snap what is noise relative to the operands to 0.
    if !result.is_finite() {
        return Err(format!(
            "{} {} is too large to express in {}.",
            display_number(value),
            source.symbol,
            target.symbol
        ));
    }
    if result.abs() <= 1e-12 * (scaled.abs() + target.offset.abs()) {
        result = 0.0;
    }
    Ok(Conversion {
        value,
        from: source.symbol.to_owned(),
        to: target.symbol.to_owned(),
        result: round_significant(result, 12),
        dimension: source.dimension.name().to_owned(),
    })
}

fn unit_list(only: Option<Dimension>) -> UnitList {
    let dimensions = Dimension::ALL
        .iter()
        .filter(|dimension| only.is_none_or(|wanted| wanted == **dimension))
        .map(|dimension| DimensionUnits {
            dimension: dimension.name().to_owned(),
            units: UNITS
                .iter()
                .filter(|unit| unit.dimension == *dimension)
                .map(|unit| UnitInfo {
                    symbol: unit.symbol.to_owned(),
                    name: unit.name.to_owned(),
                    aliases: unit
                        .aliases
                        .iter()
                        .map(|alias| (*alias).to_owned())
                        .collect(),
                })
                .collect(),
        })
        .collect();
    UnitList { dimensions }
}

/// The unit-converter MCP server: stateless, cheap to construct, one per
/// session. Serve it with [`super::spawn_unit_converter`] or any rmcp
/// transport.
#[derive(Debug, Clone)]
pub struct UnitConverter {
    tool_router: ToolRouter<Self>,
}

impl UnitConverter {
    /// Creates the server with its `convert` and `list_units` tools.
    pub fn new() -> Self {
        Self {
            tool_router: Self::tool_router(),
        }
    }
}

impl Default for UnitConverter {
    fn default() -> Self {
        Self::new()
    }
}

#[tool_router]
impl UnitConverter {
    #[tool(
        description = "Convert a number between two units of the same dimension. Supported: \
            length (mm, cm, m, km, in, ft, yd, mi, nmi), mass (mg, g, kg, t, oz, lb, st), \
            temperature (C, F, K), volume (ml, l, m3, tsp, tbsp, cup, pt, qt, gal; US measures), \
            data (B, KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB = powers of 1024), \
            time (ms, s, min, h, d, wk) and speed (m/s, km/h, mph, kn). Unit names are \
            case-insensitive and common names work too (\"meters\", \"celsius\", \"lbs\"). \
            Returns a sentence like \"10 km = 6.21371 mi\" plus structured {value, from, to, \
            result, dimension}.",
        output_schema = schema_for_output::<Conversion>(),
        annotations(
            title = "Convert units",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    fn convert(&self, Parameters(args): Parameters<ConvertArgs>) -> CallToolResult {
        match convert(args.value, &args.from, &args.to) {
            Ok(conversion) => {
                let text = format!(
                    "{} {} = {} {}",
                    display_number(conversion.value),
                    conversion.from,
                    display_number(round_significant(conversion.result, 6)),
                    conversion.to
                );
                structured_result(text, &conversion)
            }
            Err(message) => error_result(message),
        }
    }

    #[tool(
        description = "List the units `convert` understands, with their full names and \
            accepted aliases, for one dimension (length, mass, temperature, volume, data, time, \
            speed) or for all of them when `dimension` is omitted.",
        output_schema = schema_for_output::<UnitList>(),
        annotations(
            title = "List supported units",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    fn list_units(&self, Parameters(args): Parameters<ListUnitsArgs>) -> CallToolResult {
        let only = match args.dimension.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(name) => match Dimension::parse(name) {
                Some(dimension) => Some(dimension),
                None => {
                    let known = Dimension::ALL
                        .iter()
                        .map(|dimension| dimension.name())
                        .collect::<Vec<_>>()
                        .join(", ");
                    return error_result(format!(
                        "Unknown dimension \"{name}\". Supported dimensions: {known}."
                    ));
                }
            },
        };
        let list = unit_list(only);
        let text = list
            .dimensions
            .iter()
            .map(|dimension| {
                let units = dimension
                    .units
                    .iter()
                    .map(|unit| format!("{} ({})", unit.symbol, unit.name))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("{}: {units}", dimension.dimension)
            })
            .collect::<Vec<_>>()
            .join("\n");
        structured_result(text, &list)
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for UnitConverter {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(
                Implementation::new("unit-converter", env!("CARGO_PKG_VERSION"))
                    .with_title("Unit converter")
                    .with_description(
                        "Converts lengths, masses, temperatures, volumes, data sizes, \
                         durations and speeds.",
                    ),
            )
            .with_instructions(
                "Call `convert` with a value and two units of the same dimension; call \
                 `list_units` to see every supported unit and alias.",
            )
    }
}
