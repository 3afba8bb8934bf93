//! The new container's configuration, derived from the running one's `docker inspect` (pure): everything carried
//! over as it is (binds and mounts, environment, network mode, privileged, ulimits, pids limit, restart policy,
//! labels, user, working dir, and the whole host config), the image replaced, `env_add` set on top, and command
//! and entrypoint kept unless the new image's own defaults are asked for.

use bollard::models::{ContainerCreateBody, ContainerInspectResponse};

/// How the new container differs from the old one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recreate<'a> {
    /// The image the new container runs (an ID).
    pub image: &'a str,
    /// `K=V` entries set on top of the old environment (a key already there takes the new value).
    pub env_add: &'a [String],
    /// Take command and entrypoint from the new image instead of the old container.
    pub use_image_defaults: bool,
}

/// The body of `docker create` for the new container.
pub fn new_container_body(
    old: &ContainerInspectResponse,
    how: &Recreate<'_>,
) -> ContainerCreateBody {
    let config = old.config.clone().unwrap_or_default();
    let mut env = config.env.clone().unwrap_or_default();
    for added in how.env_add {
        let key = env_key(added);
        env.retain(|existing| env_key(existing) != key);
        env.push(added.clone());
    }
    let (cmd, entrypoint) = if how.use_image_defaults {
        (None, None)
    } else {
        (config.cmd.clone(), config.entrypoint.clone())
    };
    // The engine names a container's host after its short ID unless one was given: a new container gets its own.
    let hostname = config.hostname.clone().filter(|name| {
        !old.id
            .as_deref()
            .is_some_and(|id| id.starts_with(name.as_str()))
    });
    ContainerCreateBody {
        hostname,
        domainname: config.domainname.clone(),
        user: config.user.clone(),
        attach_stdin: config.attach_stdin,
        attach_stdout: config.attach_stdout,
        attach_stderr: config.attach_stderr,
        exposed_ports: config.exposed_ports.clone(),
        tty: config.tty,
        open_stdin: config.open_stdin,
        stdin_once: config.stdin_once,
        env: Some(env),
        cmd,
        healthcheck: config.healthcheck.clone(),
        args_escaped: config.args_escaped,
        image: Some(how.image.to_string()),
        volumes: config.volumes.clone(),
        working_dir: config.working_dir.clone(),
        entrypoint,
        network_disabled: config.network_disabled,
        on_build: None,
        labels: config.labels.clone(),
        stop_signal: config.stop_signal.clone(),
        stop_timeout: config.stop_timeout,
        shell: config.shell.clone(),
        host_config: old.host_config.clone(),
        networking_config: None,
    }
}

/// The variable name of a `K=V` entry.
pub fn env_key(entry: &str) -> &str {
    entry.split_once('=').map_or(entry, |(key, _)| key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerConfig, HostConfig};

    fn old() -> ContainerInspectResponse {
        ContainerInspectResponse {
            id: Some("abcdef0123456789".into()),
            config: Some(ContainerConfig {
                hostname: Some("abcdef012345".into()),
                env: Some(vec!["PATH=/bin".into(), "IS_UPGRADE=false".into()]),
                cmd: Some(vec!["serve".into()]),
                entrypoint: Some(vec!["/app".into()]),
                user: Some("admin".into()),
                working_dir: Some("/home/admin".into()),
                ..Default::default()
            }),
            host_config: Some(HostConfig {
                privileged: Some(true),
                network_mode: Some("host".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_old_configuration_is_carried_over_with_env_add_on_top() {
        let env_add = vec!["IS_UPGRADE=true".to_string(), "NEW=1".to_string()];
        let body = new_container_body(
            &old(),
            &Recreate {
                image: "sha256:new",
                env_add: &env_add,
                use_image_defaults: false,
            },
        );
        assert_eq!(body.image.as_deref(), Some("sha256:new"));
        assert_eq!(
            body.env.unwrap(),
            vec!["PATH=/bin", "IS_UPGRADE=true", "NEW=1"]
        );
        assert_eq!(body.cmd.unwrap(), vec!["serve"]);
        assert_eq!(body.entrypoint.unwrap(), vec!["/app"]);
        assert_eq!(body.user.as_deref(), Some("admin"));
        assert_eq!(body.working_dir.as_deref(), Some("/home/admin"));
        assert_eq!(body.host_config, old().host_config);
        assert_eq!(
            body.hostname, None,
            "the engine's default hostname is not carried over"
        );
    }

    #[test]
    fn image_defaults_leave_command_and_entrypoint_to_the_new_image() {
        let body = new_container_body(
            &old(),
            &Recreate {
                image: "sha256:new",
                env_add: &[],
                use_image_defaults: true,
            },
        );
        assert_eq!(body.cmd, None);
        assert_eq!(body.entrypoint, None);
    }
}
