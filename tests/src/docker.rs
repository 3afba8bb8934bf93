//! The container tests' access to the real Docker Engine, through the workspace's one client (`patchd_docker`): connect
//! (failing, never skipping, when no engine answers), build a local image from a project binary (a `FROM scratch`
//! root file system holding the binary and the shared libraries `ldd` lists: no registry, no pull), `docker save`
//! an image to a tar, create and inspect containers, and remove on drop every container and image a test made.
//!
//! ```no_run
//! use patchd_e2e::docker::DockerTest;
//! let docker = DockerTest::connect("ct-example");         // names start with `patchd-test-ct-example-<pid>`
//! let image = docker.build_image(
//!     &docker.name("worker:v1"),
//!     &patchd_e2e::bin("demo-worker"),
//!     &["/demo-worker", "serve", "--listen", "127.0.0.1:0"],
//! );
//! docker.save_image(&image, std::path::Path::new("/tmp/worker-v1.tar"));
//! // every container whose name starts with the prefix, and every image built here, is removed on drop
//! ```

use bollard::Docker;
use bollard::models::{ContainerCreateBody, ContainerInspectResponse, ImageInspect};
use patchd_docker::{DEFAULT_SOCKET, Engine};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

/// A connection to the engine for one test, and the objects it made (removed on drop).
pub struct DockerTest {
    runtime: tokio::runtime::Runtime,
    engine: Engine,
    prefix: String,
    images: Mutex<Vec<String>>,
}

impl DockerTest {
    /// Connects to the engine on [`DEFAULT_SOCKET`] (the agent's default `docker_socket`); panics naming the socket
    /// when no engine answers there (the container tests fail rather than skip: `scripts/test.sh` installs and
    /// starts `dockerd`). `test` names the test: every object made here is named `patchd-test-<test>-<pid>-...`.
    pub fn connect(test: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot build a tokio runtime: {e}"));
        let engine = runtime
            .block_on(Engine::connect(Path::new(DEFAULT_SOCKET)))
            .unwrap_or_else(|e| {
                panic!(
                    "{e}: the container tests need one (scripts/test.sh installs Debian's docker.io and starts it \
                     when it is missing)"
                )
            });
        DockerTest {
            runtime,
            engine,
            prefix: format!("patchd-test-{test}-{}", std::process::id()),
            images: Mutex::new(Vec::new()),
        }
    }

    /// `<prefix>-<what>`: a name for a container or an image reference of this test.
    pub fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    /// The prefix of every name this test uses.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bollard client, for calls the helper does not wrap.
    pub fn client(&self) -> &Docker {
        self.engine.client()
    }

    /// Runs a future on the helper's runtime.
    pub fn block_on<T>(&self, future: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }

    /// Builds image `tag` (`name:tag`) from scratch: `binary` at `/<file name>` plus the shared libraries `ldd`
    /// lists at their own paths, with `entrypoint`. Returns the image ID (`sha256:...`); removed on drop.
    pub fn build_image(&self, tag: &str, binary: &Path, entrypoint: &[&str]) -> String {
        self.build_image_with(tag, &[(binary, None)], entrypoint)
    }

    /// Like [`DockerTest::build_image`] with several files: each `(host path, Some(path in the image))` (default
    /// `/<file name>`), and the shared libraries of each.
    pub fn build_image_with(
        &self,
        tag: &str,
        files: &[(&Path, Option<&str>)],
        entrypoint: &[&str],
    ) -> String {
        let context = patchd_docker::context::scratch_context(files, entrypoint)
            .unwrap_or_else(|e| panic!("cannot make the build context of {tag}: {e}"));
        let id = self
            .runtime
            .block_on(self.engine.build_image(tag, context))
            .unwrap_or_else(|e| panic!("building image {tag} failed: {e}"));
        // Removed on drop by its tag, not its ID: two tests building the same content get the same ID, and a
        // forced removal by ID would take the other test's tag (and image) with it.
        self.track_image(tag);
        id
    }

    /// `docker save` of `image` into `out` (an uncompressed tar, as `docker load -i` reads).
    pub fn save_image(&self, image: &str, out: &Path) {
        self.runtime
            .block_on(self.engine.save_image(image, out))
            .unwrap_or_else(|e| panic!("saving image {image} failed: {e}"));
    }

    /// Removes on drop an image this test got some other way (loaded by an agent, say).
    pub fn track_image(&self, id: &str) {
        let mut images = self.images.lock().unwrap_or_else(|e| e.into_inner());
        if !images.iter().any(|known| known == id) {
            images.push(id.to_string());
        }
    }

    /// Creates container `name` (which must start with the prefix, so drop removes it) from `body`; with
    /// `start`, starts it (as `docker run -d` does). Returns its ID.
    pub fn create_container(&self, name: &str, body: ContainerCreateBody, start: bool) -> String {
        assert!(
            name.starts_with(&self.prefix),
            "container {name} must be named with the test prefix {} so it is removed",
            self.prefix
        );
        self.runtime
            .block_on(async {
                if start {
                    self.engine.run_container(name, body).await
                } else {
                    self.engine.create_container(name, body).await
                }
            })
            .unwrap_or_else(|e| panic!("creating container {name} failed: {e}"))
    }

    /// `docker inspect` of a container by name or ID; `None` when there is none.
    pub fn inspect_container(&self, name: &str) -> Option<ContainerInspectResponse> {
        self.runtime
            .block_on(self.engine.inspect_container(name))
            .unwrap_or_else(|e| panic!("inspecting container {name} failed: {e}"))
    }

    /// `docker image inspect`; `None` when there is none.
    pub fn inspect_image(&self, image: &str) -> Option<ImageInspect> {
        self.runtime
            .block_on(self.engine.inspect_image(image))
            .unwrap_or_else(|e| panic!("inspecting image {image} failed: {e}"))
    }

    /// Names (without the leading `/`) of every container, running or not, whose name starts with `prefix`.
    pub fn containers_named(&self, prefix: &str) -> Vec<String> {
        // The engine's `name` filter matches anywhere in the name: keep only those that start with `prefix`.
        let filters = HashMap::from([("name", vec![prefix])]);
        let mut names = self
            .runtime
            .block_on(self.engine.container_names(&filters))
            .unwrap_or_else(|e| panic!("listing containers failed: {e}"));
        names.retain(|name| name.starts_with(prefix));
        names
    }

    /// Removes a container (running or not) by name or ID; absent is fine.
    pub fn remove_container(&self, name: &str) {
        if let Err(e) = self.runtime.block_on(self.engine.remove_container(name)) {
            eprintln!("cannot remove container {name}: {e}");
        }
    }

    /// Removes an image by ID or reference, also one a container uses; absent is fine.
    pub fn remove_image(&self, image: &str) {
        if let Err(e) = self.runtime.block_on(self.engine.remove_image(image, true)) {
            eprintln!("cannot remove image {image}: {e}");
        }
    }
}

impl Drop for DockerTest {
    fn drop(&mut self) {
        // `<prefix>-`: a test whose pid extends this one's (123 and 1234) keeps its containers.
        for name in self.containers_named(&format!("{}-", self.prefix)) {
            self.remove_container(&name);
        }
        let images = std::mem::take(&mut *self.images.lock().unwrap_or_else(|e| e.into_inner()));
        for image in images.iter().rev() {
            self.remove_image(image);
        }
    }
}
