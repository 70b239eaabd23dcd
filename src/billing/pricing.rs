//! Money as integer micros (millionths of a US dollar) and the `price` notation of
//! DESIGN.md: `free` or `<decimal>_per_request`. No floating point anywhere.

/// Micros in one US dollar.
pub const MICROS_PER_USD: i64 = 1_000_000;
/// The highest price a tool may charge per call: 100 USD (in micros).
pub const MAX_PRICE_MICROS: i64 = 100 * MICROS_PER_USD;
/// The highest single credit grant: 1 000 000 USD (in micros).
pub const MAX_GRANT_MICROS: i64 = 1_000_000 * MICROS_PER_USD;
/// The default platform fee: 30 % in basis points.
pub const DEFAULT_PLATFORM_FEE_BPS: u32 = 3000;

/// A malformed amount or price.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    /// Not a non-negative decimal with at most six fractional digits.
    #[error("'{0}' is not an amount in USD (expected a decimal such as 0.02, at most 6 decimals)")]
    Malformed(String),
    /// Above the allowed maximum.
    #[error("'{0}' is above the maximum of {1} USD")]
    TooLarge(String, String),
    /// Neither `free` nor `<decimal>_per_request`.
    #[error(
        "'{0}' is not a pricing (expected 'free' or '<decimal>_per_request', e.g. 0.02_per_request)"
    )]
    Pricing(String),
}

/// Parses a non-negative USD decimal (`"0.02"`, `"10"`, `"5.00"`) into micros, rejecting
/// signs, exponents, more than six fractional digits and values above `max_micros`.
///
/// # Errors
/// [`PriceError::Malformed`] or [`PriceError::TooLarge`].
pub fn parse_usd(text: &str, max_micros: i64) -> Result<i64, PriceError> {
    let malformed = || PriceError::Malformed(text.to_owned());
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() && frac.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 6
        || (text.contains('.') && frac.is_empty())
    {
        return Err(malformed());
    }
    let too_large = || PriceError::TooLarge(text.to_owned(), format_usd(max_micros));
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        // Anything longer than 12 digits is above every maximum we use.
        if whole.trim_start_matches('0').len() > 12 {
            return Err(too_large());
        }
        whole.parse().map_err(|_| malformed())?
    };
    let frac_micros: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().map_err(|_| malformed())?
    };
    let micros = whole
        .checked_mul(MICROS_PER_USD)
        .and_then(|w| w.checked_add(frac_micros))
        .ok_or_else(too_large)?;
    if micros > max_micros {
        return Err(too_large());
    }
    Ok(micros)
}

/// Parses a pricing: `free` (0) or `<decimal>_per_request`, at most [`MAX_PRICE_MICROS`].
///
/// # Errors
/// [`PriceError::Pricing`] for another shape, or the errors of [`parse_usd`].
pub fn parse_pricing(text: &str) -> Result<i64, PriceError> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("free") {
        return Ok(0);
    }
    let amount = text
        .strip_suffix("_per_request")
        .ok_or_else(|| PriceError::Pricing(text.to_owned()))?;
    parse_usd(amount, MAX_PRICE_MICROS)
}

/// Formats micros as a USD decimal with at least two fractional digits and no trailing
/// zeros beyond them: `9_980_000` → `"9.98"`, `20_000` → `"0.02"`, `1_500` → `"0.0015"`.
pub fn format_usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let whole = abs / MICROS_PER_USD as u64;
    let frac = format!("{:06}", abs % MICROS_PER_USD as u64);
    let trimmed = frac.trim_end_matches('0');
    let frac = if trimmed.len() < 2 {
        &frac[..2]
    } else {
        trimmed
    };
    format!("{sign}{whole}.{frac}")
}

/// Formats a price in micros as the pricing notation (`free` or `0.02_per_request`).
pub fn format_pricing(micros: i64) -> String {
    if micros == 0 {
        "free".to_owned()
    } else {
        format!("{}_per_request", format_usd(micros))
    }
}

/// Splits `price` micros into `(creator, fee)` with fee = floor(price × bps / 10 000) and
/// creator = price − fee (DESIGN.md "platform fee"). `bps` is clamped to 10 000.
pub fn split_price(price_micros: i64, fee_bps: u32) -> (i64, i64) {
    let bps = i128::from(fee_bps.min(10_000));
    let fee = (i128::from(price_micros) * bps / 10_000) as i64;
    (price_micros - fee, fee)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_prices_as_integer_micros() {
        assert_eq!(parse_pricing("0.02_per_request"), Ok(20_000));
        assert_eq!(parse_pricing("free"), Ok(0));
        assert_eq!(parse_pricing("1_per_request"), Ok(1_000_000));
        assert_eq!(parse_pricing(".5_per_request"), Ok(500_000));
        assert_eq!(parse_usd("10.00", MAX_GRANT_MICROS), Ok(10_000_000));
        assert_eq!(parse_usd("0.000001", MAX_GRANT_MICROS), Ok(1));
    }

    #[test]
    fn refuses_bad_prices() {
        for bad in [
            "-1_per_request",
            "0.0000001_per_request",
            "1e3_per_request",
            "abc",
            "0.02",
            "_per_request",
            "1._per_request",
            "101_per_request",
            "99999999999999999999_per_request",
            " 1_per_request x",
            "NaN_per_request",
        ] {
            assert!(parse_pricing(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn formats_micros() {
        assert_eq!(format_usd(9_980_000), "9.98");
        assert_eq!(format_usd(20_000), "0.02");
        assert_eq!(format_usd(1_500), "0.0015");
        assert_eq!(format_usd(0), "0.00");
        assert_eq!(format_usd(-20_000), "-0.02");
        assert_eq!(format_pricing(20_000), "0.02_per_request");
    }

    #[test]
    fn splits_seventy_thirty() {
        assert_eq!(split_price(20_000, 3000), (14_000, 6_000));
        assert_eq!(split_price(1, 3000), (1, 0));
        assert_eq!(split_price(0, 3000), (0, 0));
    }

    proptest! {
        #[test]
        fn split_always_sums_to_price(price in 0i64..=MAX_PRICE_MICROS, bps in 0u32..=10_000) {
            let (creator, fee) = split_price(price, bps);
            prop_assert_eq!(creator + fee, price);
            prop_assert!(creator >= 0 && fee >= 0);
        }

        #[test]
        fn format_then_parse_round_trips(micros in 0i64..=MAX_GRANT_MICROS) {
            prop_assert_eq!(parse_usd(&format_usd(micros), MAX_GRANT_MICROS), Ok(micros));
        }
    }
}
