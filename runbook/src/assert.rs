//! `assert:` expressions over marks, saved values and params: `T2 - T1 < {refetch_min}m`.
//!
//! Grammar: `operand [- operand] OP operand [- operand]` with `OP` one of `< <= > >= == !=`. An operand is a mark
//! or saved value by its bare name (`T1`), an integer, or a `{param}`; an integer or param may carry a unit `s`, `m`
//! or `h` (seconds when none). Marks are Unix seconds, so `T2 - T1` is a duration in seconds.

use serde::Serialize;

/// A parsed `assert:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assertion {
    /// As written.
    pub text: String,
    /// Left side.
    pub left: Difference,
    /// Comparison.
    pub op: Comparison,
    /// Right side.
    pub right: Difference,
}

/// `a` or `a - b`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// First operand.
    pub first: Operand,
    /// Subtracted operand.
    pub minus: Option<Operand>,
}

/// An operand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operand {
    /// A mark or saved value.
    Name(String),
    /// An integer times a unit, in seconds.
    Seconds(i64),
    /// A param times a unit (seconds per unit).
    Param {
        /// Param name.
        name: String,
        /// Seconds per unit.
        unit: i64,
    },
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    /// `<`
    Less,
    /// `<=`
    LessOrEqual,
    /// `>`
    Greater,
    /// `>=`
    GreaterOrEqual,
    /// `==`
    Equal,
    /// `!=`
    NotEqual,
}

impl Comparison {
    fn holds(self, left: i64, right: i64) -> bool {
        match self {
            Comparison::Less => left < right,
            Comparison::LessOrEqual => left <= right,
            Comparison::Greater => left > right,
            Comparison::GreaterOrEqual => left >= right,
            Comparison::Equal => left == right,
            Comparison::NotEqual => left != right,
        }
    }
}

/// Why an assertion did not parse or could not be judged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertError {
    /// Syntax.
    #[error(
        "`{0}` is not an assertion; write `A [- B] OP C [- D]` with OP one of < <= > >= == != (e.g. \
         `T2 - T1 < {{refetch_min}}m`)"
    )]
    Syntax(String),
    /// A name without a value.
    #[error("`{0}` has no value: no mark or saved value of that name was recorded")]
    Unknown(String),
    /// A value that is not an integer.
    #[error("`{name}` is `{value}`, not an integer")]
    NotANumber {
        /// Name.
        name: String,
        /// Its value.
        value: String,
    },
}

impl Assertion {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Self, AssertError> {
        let syntax = || AssertError::Syntax(text.to_string());
        let (position, op_text) = ["<=", ">=", "==", "!=", "<", ">"]
            .iter()
            .filter_map(|op| text.find(op).map(|at| (at, *op)))
            .min_by_key(|(at, op)| (*at, std::cmp::Reverse(op.len())))
            .ok_or_else(syntax)?;
        let op = match op_text {
            "<" => Comparison::Less,
            "<=" => Comparison::LessOrEqual,
            ">" => Comparison::Greater,
            ">=" => Comparison::GreaterOrEqual,
            "==" => Comparison::Equal,
            _ => Comparison::NotEqual,
        };
        let left = difference(&text[..position]).ok_or_else(syntax)?;
        let right = difference(&text[position + op_text.len()..]).ok_or_else(syntax)?;
        Ok(Self {
            text: text.to_string(),
            left,
            op,
            right,
        })
    }

    /// Names (marks or saved values) and params the assertion reads.
    pub fn operands(&self) -> impl Iterator<Item = &Operand> {
        [&self.left, &self.right]
            .into_iter()
            .flat_map(|side| std::iter::once(&side.first).chain(side.minus.as_ref()))
    }

    /// Judges the assertion; `value` answers names (marks, saved values) and params.
    pub fn holds(&self, value: &dyn Fn(&str) -> Option<String>) -> Result<bool, AssertError> {
        let side = |difference: &Difference| -> Result<i64, AssertError> {
            let first = operand(&difference.first, value)?;
            Ok(match &difference.minus {
                Some(minus) => first - operand(minus, value)?,
                None => first,
            })
        };
        Ok(self.op.holds(side(&self.left)?, side(&self.right)?))
    }
}

fn operand(operand: &Operand, value: &dyn Fn(&str) -> Option<String>) -> Result<i64, AssertError> {
    let number = |name: &str| -> Result<i64, AssertError> {
        let text = value(name).ok_or_else(|| AssertError::Unknown(name.to_string()))?;
        text.trim().parse().map_err(|_| AssertError::NotANumber {
            name: name.to_string(),
            value: text,
        })
    };
    match operand {
        Operand::Name(name) => number(name),
        Operand::Seconds(seconds) => Ok(*seconds),
        Operand::Param { name, unit } => Ok(number(name)? * unit),
    }
}

fn difference(text: &str) -> Option<Difference> {
    let mut parts = text.split(" - ");
    let first = parse_operand(parts.next()?)?;
    let minus = match parts.next() {
        Some(part) => Some(parse_operand(part)?),
        None => None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(Difference { first, minus })
}

fn parse_operand(text: &str) -> Option<Operand> {
    let text = text.trim();
    let (body, unit) = match text.char_indices().last()? {
        (at, 's') if text.len() > 1 && !is_name(text) => (&text[..at], 1),
        (at, 'm') if !is_name(text) => (&text[..at], 60),
        (at, 'h') if !is_name(text) => (&text[..at], 3600),
        _ => (text, 1),
    };
    if let Some(name) = body.strip_prefix('{').and_then(|b| b.strip_suffix('}')) {
        return is_name(name).then(|| Operand::Param {
            name: name.to_string(),
            unit,
        });
    }
    if let Ok(number) = body.parse::<i64>() {
        return Some(Operand::Seconds(number * unit));
    }
    (unit == 1 && is_name(body)).then(|| Operand::Name(body.to_string()))
}

fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !text.starts_with(|c: char| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refetch_window() {
        let assertion = Assertion::parse("T2 - T1 < {refetch_min}m").unwrap();
        assert_eq!(assertion.op, Comparison::Less);
        let values = |t2: &'static str| {
            move |name: &str| match name {
                "T1" => Some("1000".to_string()),
                "T2" => Some(t2.to_string()),
                "refetch_min" => Some("30".to_string()),
                _ => None,
            }
        };
        assert!(assertion.holds(&values("2799")).unwrap());
        assert!(!assertion.holds(&values("2800")).unwrap());
        assert_eq!(
            assertion.holds(&|_| None).unwrap_err(),
            AssertError::Unknown("T2".into())
        );
    }

    #[test]
    fn bad_syntax_is_refused() {
        for text in ["T2 - T1", "T2 - T1 < ", "< 3", "T2 - - T1 < 3", "T2 < {x"] {
            assert!(Assertion::parse(text).is_err(), "{text}");
        }
        assert!(Assertion::parse("count >= 3").is_ok());
        assert!(Assertion::parse("T2 - T1 <= 90s").is_ok());
    }
}
