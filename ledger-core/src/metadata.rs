//! Free-form metadata a caller attaches to a transfer (an order number, a reason, a
//! reference in its own system), stored on the transfer's journal entry and returned
//! with it (`transfers::get`, `history::page`).
//!
//! Only a JSON object of at most [`MAX_METADATA_BYTES`] is accepted, so a ledger row
//! never carries an unbounded blob. It is kept as canonical text (keys sorted at every
//! level, no spaces): the same object always has the same text, so an idempotency key
//! compares requests by value and not by how the caller happened to order its keys.

use std::fmt;

use serde_json::Value;

use crate::input::InvalidInput;

/// The most bytes an entry's metadata takes, as canonical JSON text (the database
/// checks the same limit).
pub const MAX_METADATA_BYTES: usize = 4096;

/// A JSON object of at most [`MAX_METADATA_BYTES`] in canonical form.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Metadata {
    canonical: String,
}

impl Metadata {
    /// Metadata from a JSON value: refused unless it is an object and small enough.
    pub fn new(value: &Value) -> Result<Metadata, InvalidInput> {
        if !value.is_object() {
            return Err(bad(format!("must be a JSON object, not {}", kind_of(value))));
        }
        let mut canonical = String::new();
        write_canonical(value, &mut canonical);
        if canonical.len() > MAX_METADATA_BYTES {
            return Err(bad(format!("{} bytes; at most {MAX_METADATA_BYTES}", canonical.len())));
        }
        Ok(Metadata { canonical })
    }

    /// Metadata from JSON text, e.g. `{"order": 7}`. Text over four times the limit is
    /// refused unread (whitespace aside, it cannot fit).
    pub fn parse(text: &str) -> Result<Metadata, InvalidInput> {
        if text.len() > 4 * MAX_METADATA_BYTES {
            let (len, unread) = (text.len(), 4 * MAX_METADATA_BYTES);
            return Err(bad(format!(
                "{len} bytes of text, not read (over {unread}); its compact form may have at most {MAX_METADATA_BYTES} bytes"
            )));
        }
        let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        Metadata::new(&value)
    }

    /// Read back from the database, which only holds text that was canonical when
    /// written (and the CHECK keeps it an object).
    pub(crate) fn from_stored(text: String) -> Result<Metadata, InvalidInput> {
        Metadata::parse(&text)
    }

    /// The canonical JSON text: keys sorted, no spaces.
    pub fn as_str(&self) -> &str {
        &self.canonical
    }

    /// The object as a JSON value.
    pub fn to_value(&self) -> Value {
        serde_json::from_str(&self.canonical).expect("canonical metadata is valid JSON")
    }
}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

impl fmt::Display for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

fn bad(reason: String) -> InvalidInput {
    InvalidInput::BadField { field: "metadata", reason }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Writes `value` with every object's keys in sorted order, whatever order the map
/// keeps them in (serde_json keeps insertion order when a dependency asks it to).
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_object_has_the_same_text_whatever_its_key_order() {
        let a = Metadata::parse(r#"{"b": 1, "a": {"y": [1, {"q": 2, "p": 1}], "x": null}}"#).unwrap();
        let b = Metadata::parse(r#"{"a":{"x":null,"y":[1,{"p":1,"q":2}]},"b":1}"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_str(), r#"{"a":{"x":null,"y":[1,{"p":1,"q":2}]},"b":1}"#);
        assert_eq!(Metadata::parse(a.as_str()).unwrap(), a);
        assert_eq!(a.to_value()["b"], 1);
    }

    #[test]
    fn only_small_json_objects_are_metadata() {
        for text in ["[1]", "7", "\"x\"", "null", "true", "{", "{\"a\":}", ""] {
            assert!(
                matches!(Metadata::parse(text), Err(InvalidInput::BadField { field: "metadata", .. })),
                "{text:?} was accepted"
            );
        }
        let fits = format!(r#"{{"a":"{}"}}"#, "x".repeat(MAX_METADATA_BYTES - 8));
        assert_eq!(Metadata::parse(&fits).unwrap().as_str().len(), MAX_METADATA_BYTES);
        let over = format!(r#"{{"a":"{}"}}"#, "x".repeat(MAX_METADATA_BYTES - 7));
        assert!(Metadata::parse(&over).is_err());
        assert!(Metadata::parse(r#"{"s": "é\n\"q\""}"#).is_ok());
    }
}
