//! `yaml_edit` as a pure function: the bytes of a YAML file in, the edited bytes and what changed out.
//!
//! Edits act on the **top-level keys** of a mapping (the shape of OMS's `config.yaml`): `copy`, `rename` and
//! `delete`, each with an optional `when` (`present: KEY` / `absent: KEY`, judged on the document as the previous
//! edits left it). A key may hold one `*`, which matches any text; in `to` it stands for what it matched in `from`
//! (`oms_meta_*` → `oms_cm_meta_*`).
//!
//! **Idempotent**: applying the edits to their own output changes nothing. A copy whose target already holds the
//! same value, a rename whose source is gone and a delete of an absent key are no-ops; a copy or rename onto a key
//! holding a *different* value is refused ([`YamlEditError::Conflict`]) unless the edit says `overwrite: true`.
//!
//! **What is kept** (the `yaml-edit` crate edits the text losslessly): when nothing changes, the input bytes are
//! returned untouched. Otherwise every entry not edited keeps its text, comments, quoting and place; a renamed key
//! keeps its place and value text; a copied value keeps its text; new keys go to the end, written plain (unquoted),
//! in the order the edits create them, which reproduces OMS's sample key order exactly. Values are compared as YAML
//! (`"2883"` and `'2883'` are equal). The step that runs an edit backs the original up first and its undo restores
//! it byte for byte.

use ::yaml_edit::{Document, Mapping, YamlNode};
use serde::{Deserialize, Serialize};
use serde_norway::Value;
use std::str::FromStr;

/// One edit of a `yaml_edit` step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edit {
    /// What is done.
    pub op: EditOp,
    /// Only when this holds.
    pub when: Option<When>,
}

/// The edit operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EditOp {
    /// Copy every key matching `from` to the key `to` names.
    Copy {
        /// Source key (pattern).
        from: String,
        /// Target key (pattern).
        to: String,
        /// Replace a target that holds another value.
        overwrite: bool,
    },
    /// Move every key matching `from` to the key `to` names (the value keeps its place when the target is new).
    Rename {
        /// Source key (pattern).
        from: String,
        /// Target key (pattern).
        to: String,
        /// Replace a target that holds another value.
        overwrite: bool,
    },
    /// Remove every key matching the pattern.
    Delete(String),
}

/// An edit's condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Some key matches the pattern.
    Present(String),
    /// No key matches the pattern.
    Absent(String),
}

/// One change made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// A key was created with a copy of another's value.
    Copied {
        /// Source key.
        from: String,
        /// New key.
        to: String,
    },
    /// A key was renamed.
    Renamed {
        /// Old key.
        from: String,
        /// New key.
        to: String,
    },
    /// A key was removed.
    Deleted {
        /// Removed key.
        key: String,
    },
}

/// The result of [`apply_edits`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edited {
    /// The new file content (the input, untouched, when `changes` is empty).
    pub bytes: Vec<u8>,
    /// What changed, in order.
    pub changes: Vec<Change>,
}

/// Why an edit was refused; the file is then left as it was.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum YamlEditError {
    /// Not YAML.
    #[error("the file is not valid YAML ({0}); fix it or restore it from its backup")]
    Parse(String),
    /// Not a mapping at the top.
    #[error("the file's top level is not a mapping of keys; yaml_edit only edits top-level keys")]
    NotAMapping,
    /// A key that is not a string.
    #[error("key {0} is not a plain key; yaml_edit only edits string keys")]
    NonStringKey(String),
    /// Target holds another value.
    #[error(
        "cannot {op} `{from}` to `{to}`: `{to}` already holds a different value; remove it first or add \
         `overwrite: true` to the edit"
    )]
    Conflict {
        /// `copy` or `rename`.
        op: &'static str,
        /// Source key.
        from: String,
        /// Target key.
        to: String,
    },
    /// Writing the document failed.
    #[error("cannot write the edited document: {0}")]
    Write(String),
}

/// Applies `edits` in order to the YAML document `input`.
pub fn apply_edits(input: &[u8], edits: &[Edit]) -> Result<Edited, YamlEditError> {
    // serde's reading first: its errors name line and column, and it settles that the top is a mapping.
    let value: Value =
        serde_norway::from_slice(input).map_err(|error| YamlEditError::Parse(error.to_string()))?;
    if !matches!(value, Value::Mapping(_)) {
        return Err(YamlEditError::NotAMapping);
    }
    let text = std::str::from_utf8(input)
        .map_err(|error| YamlEditError::Parse(format!("not UTF-8: {error}")))?;
    let document =
        Document::from_str(text).map_err(|error| YamlEditError::Parse(error.to_string()))?;
    let map = document.as_mapping().ok_or(YamlEditError::NotAMapping)?;
    let mut changes = Vec::new();
    for edit in edits {
        if let Some(when) = &edit.when {
            let present = match when {
                When::Present(pattern) | When::Absent(pattern) => string_keys(&map)?
                    .iter()
                    .any(|key| capture(pattern, key).is_some()),
            };
            if present != matches!(when, When::Present(_)) {
                continue;
            }
        }
        match &edit.op {
            EditOp::Copy {
                from,
                to,
                overwrite,
            } => {
                for (source, target) in pairs(&map, from, to)? {
                    let Some(value) = map.get(source.as_str()) else {
                        continue;
                    };
                    if place(&map, "copy", &source, &target, value, *overwrite)? {
                        changes.push(Change::Copied {
                            from: source,
                            to: target,
                        });
                    }
                }
            }
            EditOp::Rename {
                from,
                to,
                overwrite,
            } => {
                for (source, target) in pairs(&map, from, to)? {
                    if source == target {
                        continue;
                    }
                    let Some(value) = map.get(source.as_str()) else {
                        continue;
                    };
                    if map.contains_key(target.as_str()) {
                        place(&map, "rename", &source, &target, value, *overwrite)?;
                        map.remove(source.as_str());
                    } else {
                        // A new name keeps the entry where it was, with its comment.
                        map.rename_key(source.as_str(), target.as_str());
                    }
                    changes.push(Change::Renamed {
                        from: source,
                        to: target,
                    });
                }
            }
            EditOp::Delete(pattern) => {
                for key in string_keys(&map)? {
                    if capture(pattern, &key).is_some() {
                        map.remove(key.as_str());
                        changes.push(Change::Deleted { key });
                    }
                }
            }
        }
    }
    if changes.is_empty() {
        return Ok(Edited {
            bytes: input.to_vec(),
            changes,
        });
    }
    let bytes = document.to_string().into_bytes();
    // The edited text must still be YAML that says what the edits meant.
    serde_norway::from_slice::<Value>(&bytes)
        .map_err(|error| YamlEditError::Write(error.to_string()))?;
    Ok(Edited { bytes, changes })
}

/// Puts `value` under `target`; false when it already held an equal value.
fn place(
    map: &Mapping,
    op: &'static str,
    source: &str,
    target: &str,
    value: YamlNode,
    overwrite: bool,
) -> Result<bool, YamlEditError> {
    match map.get(target) {
        Some(existing) if existing.yaml_eq(&value) => Ok(false),
        Some(_) if !overwrite => Err(YamlEditError::Conflict {
            op,
            from: source.to_string(),
            to: target.to_string(),
        }),
        _ => {
            map.set(target, value);
            Ok(true)
        }
    }
}

fn string_keys(map: &Mapping) -> Result<Vec<String>, YamlEditError> {
    map.keys()
        .map(|key| {
            key.as_scalar()
                .map(|scalar| scalar.as_string())
                .ok_or_else(|| YamlEditError::NonStringKey(key.to_string()))
        })
        .collect()
}

/// (source, target) key pairs for the keys matching `from`, in file order.
fn pairs(map: &Mapping, from: &str, to: &str) -> Result<Vec<(String, String)>, YamlEditError> {
    Ok(string_keys(map)?
        .into_iter()
        .filter_map(|key| {
            let matched = capture(from, &key)?;
            let target = to.replacen('*', matched, 1);
            Some((key, target))
        })
        .collect())
}

/// What the `*` of `pattern` matched in `key` (`""` for a pattern without `*` equal to the key).
pub fn capture<'k>(pattern: &str, key: &'k str) -> Option<&'k str> {
    match pattern.split_once('*') {
        None => (pattern == key).then_some(""),
        Some((prefix, suffix)) => {
            if key.len() >= prefix.len() + suffix.len()
                && key.starts_with(prefix)
                && key.ends_with(suffix)
            {
                Some(&key[prefix.len()..key.len() - suffix.len()])
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OMS_430: &str = include_str!("../tests/golden/oms_config_430.yaml");
    const OMS_431: &str = include_str!("../tests/golden/oms_config_431.yaml");

    fn oms_edits() -> Vec<Edit> {
        let when = Some(When::Present("oms_meta_*".into()));
        vec![
            Edit {
                op: EditOp::Copy {
                    from: "oms_meta_*".into(),
                    to: "oms_cm_meta_*".into(),
                    overwrite: false,
                },
                when: when.clone(),
            },
            Edit {
                op: EditOp::Copy {
                    from: "oms_meta_*".into(),
                    to: "oms_rm_meta_*".into(),
                    overwrite: false,
                },
                when: when.clone(),
            },
            Edit {
                op: EditOp::Delete("oms_meta_*".into()),
                when,
            },
        ]
    }

    #[test]
    fn oms_sample_is_migrated_as_the_seed_shows() {
        let edited = apply_edits(OMS_430.as_bytes(), &oms_edits()).unwrap();
        let got: Value = serde_norway::from_slice(&edited.bytes).unwrap();
        let want: Value = serde_norway::from_str(OMS_431).unwrap();
        assert_eq!(got, want);
        // Same keys in the same order as OMS's own V4.3.1 sample.
        let keys = |value: &Value| -> Vec<String> {
            value
                .as_mapping()
                .unwrap()
                .keys()
                .map(|k| k.as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(keys(&got), keys(&want));
        assert_eq!(edited.changes.len(), 12);
        let text = String::from_utf8(edited.bytes).unwrap();
        assert_eq!(
            text,
            include_str!("../tests/golden/oms_config_431.edited.yaml")
        );
        // Lossless: the comment and every entry not edited keep their exact text.
        for line in OMS_430.lines().filter(|line| !line.contains("oms_meta_")) {
            assert!(
                text.lines().any(|out| out == line),
                "lost `{line}`:\n{text}"
            );
        }
    }

    #[test]
    fn applying_twice_equals_once() {
        let once = apply_edits(OMS_430.as_bytes(), &oms_edits()).unwrap();
        let twice = apply_edits(&once.bytes, &oms_edits()).unwrap();
        assert!(twice.changes.is_empty());
        assert_eq!(twice.bytes, once.bytes);
    }

    #[test]
    fn conflicting_copy_is_refused_and_overwrite_allows_it() {
        let input = b"a: 1\nb: 2\n";
        let mut edit = Edit {
            op: EditOp::Copy {
                from: "a".into(),
                to: "b".into(),
                overwrite: false,
            },
            when: None,
        };
        let error = apply_edits(input, std::slice::from_ref(&edit)).unwrap_err();
        assert!(matches!(error, YamlEditError::Conflict { .. }), "{error}");
        edit.op = EditOp::Copy {
            from: "a".into(),
            to: "b".into(),
            overwrite: true,
        };
        let edited = apply_edits(input, &[edit]).unwrap();
        assert_eq!(String::from_utf8(edited.bytes).unwrap(), "a: 1\nb: 1\n");
    }

    #[test]
    fn rename_keeps_the_place_and_when_absent_skips() {
        let input = b"x: 0\nold: 1\ny: 2\n";
        let rename = Edit {
            op: EditOp::Rename {
                from: "old".into(),
                to: "new".into(),
                overwrite: false,
            },
            when: None,
        };
        let edited = apply_edits(input, std::slice::from_ref(&rename)).unwrap();
        assert_eq!(
            String::from_utf8(edited.bytes.clone()).unwrap(),
            "x: 0\nnew: 1\ny: 2\n"
        );
        let skipped = Edit {
            op: EditOp::Delete("x".into()),
            when: Some(When::Absent("new".into())),
        };
        let again = apply_edits(&edited.bytes, &[rename, skipped]).unwrap();
        assert!(again.changes.is_empty());
    }

    #[test]
    fn comments_quoting_and_places_survive_an_edit() {
        let input = b"# top\nx: 0  # keep me\n\"old\": [1, 2]\nnodes:\n  - a\n  - b\ny: 'q'\n";
        let edits = [
            Edit {
                op: EditOp::Rename {
                    from: "old".into(),
                    to: "new".into(),
                    overwrite: false,
                },
                when: None,
            },
            Edit {
                op: EditOp::Copy {
                    from: "nodes".into(),
                    to: "nodes_copy".into(),
                    overwrite: false,
                },
                when: None,
            },
            Edit {
                op: EditOp::Delete("y".into()),
                when: None,
            },
        ];
        let edited = apply_edits(input, &edits).unwrap();
        assert_eq!(
            String::from_utf8(edited.bytes).unwrap(),
            "# top\nx: 0  # keep me\nnew: [1, 2]\nnodes:\n  - a\n  - b\nnodes_copy:\n  - a\n  - b\n"
        );
    }

    #[test]
    fn untouched_input_keeps_its_bytes_and_comments() {
        let input = b"# comment\n\"a\": \"1\"\n";
        let edited = apply_edits(
            input,
            &[Edit {
                op: EditOp::Delete("missing_*".into()),
                when: None,
            }],
        )
        .unwrap();
        assert_eq!(edited.bytes, input.to_vec());
    }

    #[test]
    fn bad_input_is_named() {
        assert_eq!(
            apply_edits(b"- a\n- b\n", &[]).unwrap_err(),
            YamlEditError::NotAMapping
        );
        assert!(matches!(
            apply_edits(b"a: [\n", &[]).unwrap_err(),
            YamlEditError::Parse(_)
        ));
    }
}
