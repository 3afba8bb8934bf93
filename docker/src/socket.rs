//! Which socket the Docker Engine is reached on: an explicit path (the agent's `docker_socket`), else the
//! `unix://` path `DOCKER_HOST` names, else [`DEFAULT_SOCKET`]. Only Unix sockets: no TCP, no TLS.

use crate::DockerError;
use std::path::{Path, PathBuf};

/// The socket the engine listens on when nothing names another.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// `explicit` when given; else the path of `DOCKER_HOST=unix://…`; else [`DEFAULT_SOCKET`]. A `DOCKER_HOST`
/// with another scheme is refused ([`DockerError::NotUnixSocket`]).
pub fn resolve(explicit: Option<&Path>) -> Result<PathBuf, DockerError> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    from_docker_host(std::env::var("DOCKER_HOST").ok().as_deref())
}

/// The socket a `DOCKER_HOST` value names (`None` or empty: [`DEFAULT_SOCKET`]).
pub fn from_docker_host(value: Option<&str>) -> Result<PathBuf, DockerError> {
    match value {
        Some(value) if !value.is_empty() => match value.strip_prefix("unix://") {
            Some(path) => Ok(PathBuf::from(path)),
            None => Err(DockerError::NotUnixSocket {
                value: value.to_owned(),
            }),
        },
        _ => Ok(PathBuf::from(DEFAULT_SOCKET)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_host_names_a_unix_socket_or_is_refused() {
        assert_eq!(
            from_docker_host(None).unwrap(),
            PathBuf::from(DEFAULT_SOCKET)
        );
        assert_eq!(
            from_docker_host(Some("")).unwrap(),
            PathBuf::from(DEFAULT_SOCKET)
        );
        assert_eq!(
            from_docker_host(Some("unix:///run/user/1000/docker.sock")).unwrap(),
            PathBuf::from("/run/user/1000/docker.sock")
        );
        let refused = from_docker_host(Some("tcp://10.0.0.1:2375"))
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("tcp://10.0.0.1:2375") && refused.contains("unix://"),
            "{refused}"
        );
        assert_eq!(
            resolve(Some(Path::new("/srv/docker.sock"))).unwrap(),
            PathBuf::from("/srv/docker.sock")
        );
    }
}
