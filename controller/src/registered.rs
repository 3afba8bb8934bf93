//! A registered cluster as the commands and the rollout runner need it: its topology from the store and the
//! controller's TLS identity for its agents.

use crate::home::Home;
use crate::store::{Store, StoreError, StoredCluster};
use crate::tls_files::{ControllerTls, ControllerTlsError};
use crate::topology::{Topology, TopologyError};

/// The registered cluster cannot be used; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RegisteredError {
    /// No cluster of that name; `known` lists the registered ones.
    #[error(
        "no cluster named `{cluster}` (registered: {known}); register it with `patchctl cluster import {cluster} \
         <topology.yaml>`"
    )]
    Unknown {
        /// The name asked for.
        cluster: String,
        /// The registered names, comma-separated, or `none yet`.
        known: String,
    },
    /// The topology in the store no longer parses (written by an older patchctl, say).
    #[error("the stored topology of cluster `{cluster}` no longer parses; re-import it")]
    StoredTopology {
        /// The cluster.
        cluster: String,
        /// Why it does not parse.
        #[source]
        source: TopologyError,
    },
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The controller's certificates could not be loaded.
    #[error(transparent)]
    Tls(#[from] ControllerTlsError),
}

/// The registered cluster as stored; an unknown name lists the known ones.
pub fn load_cluster(store: &Store, cluster: &str) -> Result<StoredCluster, RegisteredError> {
    let Some(stored) = store.load_cluster(cluster)? else {
        let known: Vec<String> = store.list_clusters()?.into_iter().map(|c| c.name).collect();
        let known = if known.is_empty() {
            "none yet".to_string()
        } else {
            known.join(", ")
        };
        return Err(RegisteredError::Unknown {
            cluster: cluster.to_string(),
            known,
        });
    };
    Ok(stored)
}

/// The registered cluster's topology; an unknown name lists the known ones.
pub fn load_topology(store: &Store, cluster: &str) -> Result<Topology, RegisteredError> {
    let stored = load_cluster(store, cluster)?;
    Topology::parse(&stored.yaml).map_err(|source| RegisteredError::StoredTopology {
        cluster: cluster.to_string(),
        source,
    })
}

/// The controller's TLS identity for this cluster's agents.
pub fn load_tls(home: &Home, topology: &Topology) -> Result<ControllerTls, RegisteredError> {
    Ok(ControllerTls::load_dir(&topology.agent.tls_dir(home))?)
}
