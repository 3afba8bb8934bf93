//! The Docker Engine behind one small trait, [`ContainerEngine`]: the calls a container swap makes (load an image
//! archive, inspect images and containers, create, start, stop, rename, remove). The real one talks to the
//! engine's API on its Unix socket through the workspace's one client, `patchd_docker` ([`bollard_engine`]); the
//! engine unit tests use a fake.
//! [`recreate`] derives the new container's configuration from the old one's (pure).

pub mod bollard_engine;
pub mod recreate;

use async_trait::async_trait;
use bollard::models::{ContainerCreateBody, ContainerInspectResponse};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An engine call failed; each variant says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(
        "the Docker Engine does not answer on unix://{}: {detail}; start dockerd, or set the service's \
         `docker_socket` to the engine's socket",
        socket.display()
    )]
    Unreachable { socket: PathBuf, detail: String },
    #[error("docker {op} {target} failed: {detail}")]
    Call {
        op: &'static str,
        target: String,
        detail: String,
    },
    #[error("cannot read image archive {}: {source}", path.display())]
    Archive {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the swap needs to know about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    /// `sha256:<hex>`, the config digest.
    pub id: String,
    pub repo_tags: Vec<String>,
}

/// The Docker Engine calls a container swap makes. Names or IDs are accepted wherever a container is named.
#[async_trait]
pub trait ContainerEngine: Send + Sync + std::fmt::Debug {
    /// The socket the engine is reached on (for messages).
    fn socket(&self) -> &Path;
    /// `docker load` of a `docker save` archive.
    async fn load_image(&self, archive: &Path) -> Result<(), ContainerError>;
    /// `docker image inspect`; `None` when there is no such image.
    async fn inspect_image(&self, reference: &str) -> Result<Option<ImageFacts>, ContainerError>;
    /// `docker inspect` of a container; `None` when there is none.
    async fn inspect_container(
        &self,
        name: &str,
    ) -> Result<Option<ContainerInspectResponse>, ContainerError>;
    /// `docker create --name <name>`; the new container's ID.
    async fn create_container(
        &self,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, ContainerError>;
    /// `docker start` (a running container is fine).
    async fn start_container(&self, name: &str) -> Result<(), ContainerError>;
    /// `docker stop -t <grace>` (a stopped container is fine).
    async fn stop_container(&self, name: &str, grace: Duration) -> Result<(), ContainerError>;
    /// `docker rename`.
    async fn rename_container(&self, name: &str, new_name: &str) -> Result<(), ContainerError>;
    /// `docker rm -f` (an absent container is fine).
    async fn remove_container(&self, name: &str) -> Result<(), ContainerError>;
    /// `docker rmi` without force (an absent image is fine; one a container uses is refused by the engine).
    async fn remove_image(&self, id: &str) -> Result<(), ContainerError>;
}

/// The container's name as the engine reports it (`/name`), without the slash.
pub fn bare_name(inspected: &ContainerInspectResponse) -> String {
    inspected
        .name
        .as_deref()
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_string()
}

/// Docker names allow `[a-zA-Z0-9][a-zA-Z0-9_.-]*`: a patch id's `@` and `:` become `_`.
fn name_part(patch_id: &str) -> String {
    patch_id.replace(['@', ':'], "_")
}

/// The name the old container has while the new one runs under its name: `<name>.patchd-old-<patch>`.
pub fn aside_name(container: &str, patch_id: &str) -> String {
    format!("{container}.patchd-old-{}", name_part(patch_id))
}

/// The name the new container is created under, before it takes the service's name: `<name>.patchd-new-<patch>`.
pub fn new_name(container: &str, patch_id: &str) -> String {
    format!("{container}.patchd-new-{}", name_part(patch_id))
}

/// `tag (short id)` for display: the first repo tag, and the first 12 hex digits of the ID.
pub fn image_label(facts: &ImageFacts) -> String {
    let short = short_id(&facts.id);
    match facts.repo_tags.first() {
        Some(tag) => format!("{tag} ({short})"),
        None => short,
    }
}

/// The first 12 hex digits of an image or container ID.
pub fn short_id(id: &str) -> String {
    id.trim_start_matches("sha256:").chars().take(12).collect()
}

/// Whether `name` is a valid Docker container name.
pub fn is_container_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name.len() <= 200
}
