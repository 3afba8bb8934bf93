//! Batch sizes and unavailability budgets: a count (`3`) or a percent of a role (`25%`), parsed and printed.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A count (`3`) or a percent of the role's nodes (`25%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Amount {
    /// That many nodes.
    Count(u32),
    /// That percent of the role's nodes, rounded down, at least 1.
    Percent(u32),
}

/// A malformed `--batch-size` / `--max-unavailable` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid amount `{input}`: {reason}; write a count such as `3` or a percent such as `25%`")]
pub struct AmountError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Amount {
    /// The amount for a role of `total` nodes: a percent rounds down, with a minimum of 1.
    pub fn resolve(self, total: usize) -> usize {
        match self {
            Amount::Count(count) => count as usize,
            Amount::Percent(percent) => (total * percent as usize / 100).max(1),
        }
    }
}

impl FromStr for Amount {
    type Err = AmountError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| AmountError {
            input: text.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = text.trim();
        let (digits, is_percent) = match trimmed.strip_suffix('%') {
            Some(rest) => (rest.trim_end(), true),
            None => (trimmed, false),
        };
        if digits.is_empty() {
            return Err(fail("it is empty"));
        }
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(fail("it is not a whole number"));
        }
        let value: u32 = digits
            .parse()
            .map_err(|_| fail("the number is too large"))?;
        if value == 0 {
            return Err(fail("it must be at least 1"));
        }
        if is_percent {
            if value > 100 {
                return Err(fail("a percent must be between 1% and 100%"));
            }
            Ok(Amount::Percent(value))
        } else {
            Ok(Amount::Count(value))
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(count) => write!(f, "{count}"),
            Amount::Percent(percent) => write!(f, "{percent}%"),
        }
    }
}

impl From<Amount> for String {
    fn from(amount: Amount) -> Self {
        amount.to_string()
    }
}

impl TryFrom<String> for Amount {
    type Error = AmountError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}
