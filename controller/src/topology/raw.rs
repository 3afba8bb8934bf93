//! The topology file as serde reads it (roles in file order, scalars and durations as written), before
//! validation.

use super::*;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTopology {
    #[serde(default, deserialize_with = "optional_scalar")]
    pub(super) name: Option<String>,
    #[serde(default, deserialize_with = "optional_scalar")]
    pub(super) version: Option<String>,
    #[serde(default)]
    pub(super) agent: RawAgent,
    pub(super) roles: OrderedRoles,
    #[serde(default)]
    pub(super) databases: std::collections::BTreeMap<String, RawDatabase>,
}

/// `databases.<name>`: a database upgrade runbooks' `sql` steps and checks name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatabase {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) user: String,
    pub(super) password_file: Option<PathBuf>,
    pub(super) password_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    pub(super) port: Option<u16>,
    pub(super) tls_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRole {
    pub(super) component: Option<String>,
    pub(super) service: Option<String>,
    #[serde(default)]
    pub(super) hooks: RawHooks,
    #[serde(default)]
    pub(super) nodes: Vec<RawNode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHooks {
    pub(super) offline: Option<RawHook>,
    pub(super) wait_offline: Option<RawHook>,
    pub(super) online: Option<RawHook>,
    pub(super) wait_online: Option<RawHook>,
    pub(super) health: Option<RawHook>,
    pub(super) leader: Option<RawHook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHook {
    #[serde(default)]
    pub(super) method: HttpMethod,
    pub(super) url: String,
    pub(super) body: Option<String>,
    pub(super) field: Option<String>,
    #[serde(default, deserialize_with = "optional_scalar")]
    pub(super) equals: Option<String>,
    #[serde(default, deserialize_with = "optional_scalar")]
    pub(super) not_equals: Option<String>,
    pub(super) expect_status: Option<u16>,
    #[serde(default, deserialize_with = "optional_duration")]
    pub(super) interval: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    pub(super) timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    #[serde(default, deserialize_with = "optional_scalar")]
    pub(super) id: Option<String>,
    pub(super) host: String,
    pub(super) port: u16,
    #[serde(default, deserialize_with = "optional_scalar")]
    pub(super) name: Option<String>,
    #[serde(default, deserialize_with = "optional_scalar")]
    pub(super) ports: Option<String>,
    pub(super) deploy_dir: String,
    pub(super) data_dir: Option<String>,
    pub(super) service: Option<String>,
    pub(super) agent_port: Option<u16>,
    pub(super) os_arch: Option<String>,
}

/// `roles:` as a mapping whose order is kept (it is the rollout order).
#[derive(Debug)]
pub(super) struct OrderedRoles(pub(super) Vec<(String, RawRole)>);

impl<'de> Deserialize<'de> for OrderedRoles {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RolesVisitor;
        impl<'de> Visitor<'de> for RolesVisitor {
            type Value = OrderedRoles;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping from role name to role (component, service, hooks, nodes)")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut roles: Vec<(String, RawRole)> = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    if roles.iter().any(|(known, _)| *known == name) {
                        return Err(de::Error::custom(format!(
                            "role `{name}` is defined twice; merge its nodes into one entry"
                        )));
                    }
                    let role = map.next_value::<RawRole>()?;
                    roles.push((name, role));
                }
                Ok(OrderedRoles(roles))
            }
        }
        deserializer.deserialize_map(RolesVisitor)
    }
}

/// A string, also accepting a number or a boolean written without quotes (`version: 1.0`, `equals: true`).
pub(super) fn optional_scalar<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    struct ScalarVisitor;
    impl<'de> Visitor<'de> for ScalarVisitor {
        type Value = Option<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string, number or boolean")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_any(self)
        }
        fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
            Ok(Some(value.to_string()))
        }
        fn visit_bool<E: de::Error>(self, value: bool) -> Result<Self::Value, E> {
            Ok(Some(value.to_string()))
        }
        fn visit_i64<E: de::Error>(self, value: i64) -> Result<Self::Value, E> {
            Ok(Some(value.to_string()))
        }
        fn visit_u64<E: de::Error>(self, value: u64) -> Result<Self::Value, E> {
            Ok(Some(value.to_string()))
        }
        fn visit_f64<E: de::Error>(self, value: f64) -> Result<Self::Value, E> {
            Ok(Some(value.to_string()))
        }
    }
    deserializer.deserialize_option(ScalarVisitor)
}

/// A humantime duration (`200ms`, `10s`, `1m 30s`).
pub(super) fn optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    let Some(text) = optional_scalar(deserializer)? else {
        return Ok(None);
    };
    let duration = humantime::parse_duration(text.trim()).map_err(|error| {
        de::Error::custom(format!(
            "invalid duration `{text}` ({error}); write a duration such as `500ms` or `10s`"
        ))
    })?;
    if duration.is_zero() {
        return Err(de::Error::custom(format!(
            "duration `{text}` is zero; give a positive duration such as `1s`"
        )));
    }
    Ok(Some(duration))
}

pub(super) fn syntax_error(error: serde_norway::Error) -> TopologyError {
    let location = error.location();
    let mut message = error.to_string();
    // The location is reported in front; drop serde_norway's own " at line L column C" suffix.
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    TopologyError::Syntax {
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        message,
    }
}

// ----- semantic validation -----

/// Characters that would need escaping in a URL path or break `-N a,b` splitting.
pub(super) fn bad_name_char(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '/' | '?' | '#' | '{' | '}' | ',' | '%' | '"' | '\'' | '\\'
        )
}
