//! Redaction (issue 3 item 6): JSONPath expressions (RFC 9535, through
//! `serde_json_path`) whose matches are removed from a result's `structuredContent`
//! and from every text content block that holds JSON, before the result reaches the
//! client. Rules come from the server's and the key's trust policy (both apply). Each
//! path is evaluated from the root of the structured content or of the parsed text,
//! e.g. `$.email`, `$.users[*].ssn`, `$..password`.

use serde_json::Value;
use serde_json_path::JsonPath;

/// Most redaction paths per server or key.
pub const MAX_PATHS: usize = 32;
/// Longest redaction path, characters.
pub const MAX_PATH_LEN: usize = 256;

/// A path that does not parse, or too many.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedactError {
    /// Not an RFC 9535 JSONPath query, or longer than 256 characters.
    #[error("invalid redaction path '{0}' (expected an RFC 9535 JSONPath such as $.email)")]
    InvalidPath(String),
    /// More than [`MAX_PATHS`].
    #[error("at most {MAX_PATHS} redaction paths")]
    TooMany,
}

/// Validates redaction paths (the CLI and policy writes call it).
///
/// # Errors
/// [`RedactError`].
pub fn validate(paths: &[String]) -> Result<(), RedactError> {
    if paths.len() > MAX_PATHS {
        return Err(RedactError::TooMany);
    }
    for p in paths {
        if p.chars().count() > MAX_PATH_LEN || p.trim() == "$" || JsonPath::parse(p).is_err() {
            return Err(RedactError::InvalidPath(p.chars().take(64).collect()));
        }
    }
    Ok(())
}

/// Removes every node matched by `paths` from `value`; returns how many were removed.
/// Paths that do not parse are skipped (they were validated when stored); the root
/// itself is never removed.
pub fn redact_value(value: &mut Value, paths: &[String]) -> usize {
    let mut removed = 0;
    for p in paths {
        let Ok(path) = JsonPath::parse(p) else {
            continue;
        };
        let mut targets: Vec<Vec<Segment>> = path
            .query_located(value)
            .locations()
            .map(|loc| {
                loc.iter()
                    .map(|e| match e.as_index() {
                        Some(i) => Segment::Index(i),
                        None => Segment::Name(e.as_name().unwrap_or_default().to_owned()),
                    })
                    .collect()
            })
            .filter(|segments: &Vec<Segment>| !segments.is_empty())
            .collect();
        // Children before parents and higher array indices before lower, so earlier
        // removals never shift later targets.
        targets.sort();
        targets.dedup();
        for target in targets.iter().rev() {
            if remove(value, target) {
                removed += 1;
            }
        }
    }
    removed
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Segment {
    Index(usize),
    Name(String),
}

fn remove(root: &mut Value, path: &[Segment]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = root;
    for seg in parents {
        node = match (seg, node) {
            (Segment::Index(i), Value::Array(a)) => match a.get_mut(*i) {
                Some(n) => n,
                None => return false,
            },
            (Segment::Name(k), Value::Object(o)) => match o.get_mut(k) {
                Some(n) => n,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, node) {
        (Segment::Index(i), Value::Array(a)) if *i < a.len() => {
            a.remove(*i);
            true
        }
        (Segment::Name(k), Value::Object(o)) => o.remove(k).is_some(),
        _ => false,
    }
}

/// Applies `paths` to a `CallToolResult` JSON object: its `structuredContent`, and each
/// `content` item of type `text` whose text parses as a JSON object or array (re-encoded
/// after removal). Returns how many nodes were removed.
pub fn redact_result(result: &mut Value, paths: &[String]) -> usize {
    if paths.is_empty() {
        return 0;
    }
    let mut removed = 0;
    if let Some(structured) = result.get_mut("structuredContent") {
        removed += redact_value(structured, paths);
    }
    if let Some(Value::Array(items)) = result.get_mut("content") {
        for item in items {
            if item.get("type").and_then(Value::as_str) != Some("text") {
                continue;
            }
            let Some(Value::String(text)) = item.get_mut("text") else {
                continue;
            };
            let Ok(mut parsed) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if !(parsed.is_object() || parsed.is_array()) {
                continue;
            }
            let n = redact_value(&mut parsed, paths);
            if n > 0 {
                *text = parsed.to_string();
                removed += n;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn removes_matches_from_structured_and_json_text() {
        let mut r = json!({
            "content": [
                {"type": "text", "text": "{\"email\":\"a@b.c\",\"name\":\"A\"}"},
                {"type": "text", "text": "plain words"},
            ],
            "structuredContent": {"email": "a@b.c", "name": "A",
                "users": [{"ssn": "1", "id": 1}, {"ssn": "2", "id": 2}]},
        });
        let paths = vec!["$.email".to_owned(), "$.users[*].ssn".to_owned()];
        assert_eq!(redact_result(&mut r, &paths), 4);
        assert_eq!(
            r["structuredContent"],
            json!({"name": "A", "users": [{"id": 1}, {"id": 2}]})
        );
        assert_eq!(r["content"][0]["text"], json!("{\"name\":\"A\"}"));
        assert_eq!(r["content"][1]["text"], json!("plain words"));
    }

    #[test]
    fn removes_array_elements_without_shifting_mistakes() {
        let mut v = json!({"xs": [0, 1, 2, 3, 4]});
        assert_eq!(redact_value(&mut v, &["$.xs[1,3]".to_owned()]), 2);
        assert_eq!(v, json!({"xs": [0, 2, 4]}));
        let mut v = json!({"a": {"password": 1, "b": {"password": 2}}});
        assert_eq!(redact_value(&mut v, &["$..password".to_owned()]), 2);
        assert_eq!(v, json!({"a": {"b": {}}}));
    }

    #[test]
    fn validates_paths() {
        assert!(validate(&["$.a".into(), "$..b[*]".into()]).is_ok());
        for bad in ["email", "$.", "$[", "$", "'; DROP TABLE x; --"] {
            assert!(validate(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }
}
