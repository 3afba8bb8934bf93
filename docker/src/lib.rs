//! The one Docker Engine client of the workspace, over the engine's API on its Unix socket (`bollard`): which
//! socket ([`socket`]), a connection with the API version negotiated and a ping that names the socket
//! ([`Engine`]), the calls the agent's container swap, `patchctl` and the tests make (build, save, load, inspect,
//! create, start, stop, rename, list, remove), the `FROM scratch` build context from a binary and the shared
//! libraries `ldd` lists ([`context`]), and the one error type ([`DockerError`]).

#![forbid(unsafe_code)]

pub mod context;
mod engine;
mod error;
pub mod socket;

pub use engine::{Engine, ExecOutput};
pub use error::DockerError;
pub use socket::DEFAULT_SOCKET;
