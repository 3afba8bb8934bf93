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
