//! [`DockerError`]: why the Docker Engine could not do what was asked; each variant names the socket, the image
//! or the file, and what to do.

use crate::DEFAULT_SOCKET;
use std::path::PathBuf;

/// A Docker Engine call, or the preparation of its input, failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// `DOCKER_HOST` names something other than a Unix socket.
    #[error(
        "DOCKER_HOST={value} is not a Unix socket: patchd reaches the Docker Engine only over its Unix socket; \
         set DOCKER_HOST=unix:///path/to/docker.sock or unset it (default {DEFAULT_SOCKET})"
    )]
    NotUnixSocket { value: String },

    /// No engine answers on the socket (at connect, or the engine went away during a call).
    #[error(
        "no Docker Engine answers on {}: {detail}; start the Docker Engine (`systemctl start docker` or `dockerd`), \
         or point DOCKER_HOST=unix://… at its socket",
        socket.display()
    )]
    Unreachable { socket: PathBuf, detail: String },

    /// The engine has no image by that reference.
    #[error(
        "the Docker Engine on {} has no image `{reference}` ({detail}); build or load it first \
         (`docker images` lists what it has), or pass a `docker save` archive instead",
        socket.display()
    )]
    NoSuchImage {
        socket: PathBuf,
        reference: String,
        detail: String,
    },

    /// The engine answered a call with an error (`detail` is its message).
    #[error("docker {action} {target} on the Docker Engine on {} failed: {detail}", socket.display())]
    Call {
        action: &'static str,
        target: String,
        socket: PathBuf,
        detail: String,
    },

    /// A local file the call reads or writes (an image archive, a build context's input, `ldd`) failed.
    #[error("{action} {}: {source}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
