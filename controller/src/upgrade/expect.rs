//! What a check's answer must be, and `save:` of an HTTP answer: pure functions over the answer's bytes.

use crate::hooks::{lookup, value_text};
use patchd_runbook::Expect;

/// A check's verdict when it could be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The expectation holds (a short account).
    Met(String),
    /// It does not (why).
    NotMet(String),
}

/// `field` (dotted path, `.` for the whole answer) of a JSON answer, as text (strings without quotes).
pub fn field_text(body: &[u8], field: &str) -> Result<String, String> {
    let document: serde_json::Value = match serde_json::from_slice(body) {
        Ok(document) => document,
        // A whole answer that is not JSON is kept as its text (a plain-text parameter value).
        Err(_) if field == "." => return Ok(String::from_utf8_lossy(body).into_owned()),
        Err(error) => {
            return Err(format!(
                "the answer is not JSON ({error}), so field `{field}` cannot be read"
            ));
        }
    };
    if field == "." {
        return Ok(value_text(&document));
    }
    lookup(&document, field)
        .filter(|value| !value.is_null())
        .map(value_text)
        .ok_or_else(|| format!("the answer has no field `{field}`"))
}

/// Compares a JSON answer with a field expectation.
pub fn json_verdict(body: &[u8], expect: &Expect) -> Result<Verdict, String> {
    let (field, value, equal_wanted) = match expect {
        Expect::FieldEquals { field, value } => (field, value, true),
        Expect::FieldNotEquals { field, value } => (field, value, false),
        Expect::Exit(_) | Expect::NoRows => {
            return Err(format!(
                "this check cannot expect {}: an HTTP answer is compared by `field:`",
                describe(expect)
            ));
        }
    };
    let found = match field_text(body, field) {
        Ok(found) => found,
        Err(why) => return Ok(Verdict::NotMet(why)),
    };
    Ok(match (found == *value, equal_wanted) {
        (true, true) => Verdict::Met(format!("{field} = {found}")),
        (false, false) => Verdict::Met(format!("{field} = {found}, not {value}")),
        (false, true) => Verdict::NotMet(format!("`{field}` is `{found}`, expected `{value}`")),
        (true, false) => Verdict::NotMet(format!("`{field}` is `{found}`, which it must not be")),
    })
}

/// Compares a command's exit code (and, for a field expectation, its output as JSON).
pub fn command_verdict(exit_code: i32, stdout: &[u8], expect: &Expect) -> Result<Verdict, String> {
    match expect {
        Expect::Exit(wanted) if *wanted == exit_code => {
            Ok(Verdict::Met(format!("exit code {exit_code}")))
        }
        Expect::Exit(wanted) => Ok(Verdict::NotMet(format!(
            "exit code {exit_code}, expected {wanted}"
        ))),
        Expect::NoRows => Err("`no_rows:` is for an SQL check".to_string()),
        field => json_verdict(stdout, field),
    }
}

/// Compares an SQL answer's row count.
pub fn rows_verdict(rows: usize, expect: &Expect) -> Result<Verdict, String> {
    match expect {
        Expect::NoRows if rows == 0 => Ok(Verdict::Met("no rows".to_string())),
        Expect::NoRows => Ok(Verdict::NotMet(format!("{rows} row(s), expected none"))),
        other => Err(format!(
            "an SQL check expects `no_rows: true`, not {}",
            describe(other)
        )),
    }
}

fn describe(expect: &Expect) -> String {
    match expect {
        Expect::Exit(code) => format!("`exit: {code}`"),
        Expect::FieldEquals { field, .. } | Expect::FieldNotEquals { field, .. } => {
            format!("`field: {field}`")
        }
        Expect::NoRows => "`no_rows: true`".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn equals(field: &str, value: &str) -> Expect {
        Expect::FieldEquals {
            field: field.into(),
            value: value.into(),
        }
    }

    #[test]
    fn fields_compare_as_text_and_a_missing_field_does_not_hold() {
        let body = br#"{"data": {"enable": true, "name": "ha"}, "list": [{"x": 1}]}"#;
        assert!(matches!(
            json_verdict(body, &equals("data.enable", "true")),
            Ok(Verdict::Met(_))
        ));
        assert!(matches!(
            json_verdict(body, &equals("data.name", "ha")),
            Ok(Verdict::Met(_))
        ));
        assert!(matches!(
            json_verdict(body, &equals("list.0.x", "1")),
            Ok(Verdict::Met(_))
        ));
        assert!(matches!(
            json_verdict(body, &equals("data.name", "x")),
            Ok(Verdict::NotMet(_))
        ));
        assert!(matches!(
            json_verdict(body, &equals("nope", "x")),
            Ok(Verdict::NotMet(_))
        ));
        let not = Expect::FieldNotEquals {
            field: "data.name".into(),
            value: "ha".into(),
        };
        assert!(matches!(json_verdict(body, &not), Ok(Verdict::NotMet(_))));
        assert!(json_verdict(body, &Expect::NoRows).is_err());
    }

    #[test]
    fn saved_fields_keep_objects_as_json_and_the_whole_answer_as_text() {
        let body = br#"{"value": {"enable": true}, "s": "x"}"#;
        assert_eq!(
            field_text(body, "value").expect("value"),
            r#"{"enable":true}"#
        );
        assert_eq!(field_text(body, "s").expect("s"), "x");
        assert_eq!(field_text(b"plain", ".").expect("whole"), "plain");
        assert!(field_text(b"plain", "value").is_err());
    }

    #[test]
    fn exit_codes_and_row_counts() {
        assert!(matches!(
            command_verdict(0, b"", &Expect::Exit(0)),
            Ok(Verdict::Met(_))
        ));
        assert!(matches!(
            command_verdict(2, b"", &Expect::Exit(0)),
            Ok(Verdict::NotMet(_))
        ));
        assert!(matches!(
            rows_verdict(0, &Expect::NoRows),
            Ok(Verdict::Met(_))
        ));
        assert!(matches!(
            rows_verdict(3, &Expect::NoRows),
            Ok(Verdict::NotMet(_))
        ));
        assert!(rows_verdict(0, &Expect::Exit(0)).is_err());
    }
}
