//! Roles per RPC: every call is checked against the [`ControllerRole`] its client certificate carries before any
//! handler runs. `observer` may call Info and Status; `operator` may call everything. A certificate without a role
//! (issued before roles existed) counts as an observer. Mutating calls are logged with the caller's CN, serial and
//! operator; the caller travels on to the handlers in the request extensions ([`PeerIdentity`]).

use patchd_tls::{ControllerRole, PeerIdentity};
use tonic::Status;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The gRPC methods of `patchd.v1.Agent`, by the last segment of their path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Info,
    Status,
    QueryBlob,
    Upload,
    Stage,
    Apply,
    Rollback,
    UpgradeStep,
}

impl Rpc {
    /// The method a request path names (`/patchd.v1.Agent/Apply`), if it is one of ours.
    fn from_path(path: &str) -> Option<Self> {
        let method = path.strip_prefix("/patchd.v1.Agent/")?;
        Some(match method {
            "Info" => Rpc::Info,
            "Status" => Rpc::Status,
            "QueryBlob" => Rpc::QueryBlob,
            "Upload" => Rpc::Upload,
            "Stage" => Rpc::Stage,
            "Apply" => Rpc::Apply,
            "Rollback" => Rpc::Rollback,
            "UpgradeStep" => Rpc::UpgradeStep,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Rpc::Info => "Info",
            Rpc::Status => "Status",
            Rpc::QueryBlob => "QueryBlob",
            Rpc::Upload => "Upload",
            Rpc::Stage => "Stage",
            Rpc::Apply => "Apply",
            Rpc::Rollback => "Rollback",
            Rpc::UpgradeStep => "UpgradeStep",
        }
    }

    /// Whether `role` may call this method.
    pub fn allowed_for(self, role: ControllerRole) -> bool {
        match role {
            ControllerRole::Operator => true,
            ControllerRole::Observer => matches!(self, Rpc::Info | Rpc::Status),
        }
    }

    /// Calls that change the host (or its blob cache), logged with their caller.
    fn mutates(self) -> bool {
        matches!(
            self,
            Rpc::Upload | Rpc::Stage | Rpc::Apply | Rpc::Rollback | Rpc::UpgradeStep
        )
    }
}

/// Who may call what: the caller of `request` if its certificate's role allows the method, else
/// `PERMISSION_DENIED` naming the role and the method (and `UNAUTHENTICATED` without a client certificate, which
/// the handshake already prevents).
pub fn authorize<B>(request: &http::Request<B>) -> Result<PeerIdentity, Status> {
    let path = request.uri().path();
    let caller = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .and_then(|certs| certs.first().map(|der| PeerIdentity::from_der(der)))
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?
        .map_err(|e| Status::unauthenticated(format!("unreadable client certificate: {e}")))?;
    // Unknown methods fall through to the router's UNIMPLEMENTED, whatever the role.
    let Some(rpc) = Rpc::from_path(path) else {
        return Ok(caller);
    };
    let role = caller.role.unwrap_or(ControllerRole::Observer);
    if !rpc.allowed_for(role) {
        tracing::warn!(
            rpc = rpc.name(),
            caller = %caller.describe(),
            role = role.as_str(),
            "refused a call the caller's role does not allow"
        );
        let role_text = match caller.role {
            Some(role) => format!("role `{}`", role.as_str()),
            None => "no role (issued before roles; treated as `observer`)".to_string(),
        };
        return Err(Status::permission_denied(format!(
            "{} has {role_text}, which may not call {}: an `observer` may call Info and Status only; use a \
             certificate issued with `patchctl cert issue <name> --role operator`",
            caller.describe(),
            rpc.name()
        )));
    }
    if rpc.mutates() {
        tracing::info!(
            rpc = rpc.name(),
            cn = %caller.common_name,
            serial = %caller.serial,
            operator = caller.operator.as_deref().unwrap_or(""),
            "mutating call"
        );
    }
    Ok(caller)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observers_may_only_read_and_operators_may_do_everything() {
        let all = [
            Rpc::Info,
            Rpc::Status,
            Rpc::QueryBlob,
            Rpc::Upload,
            Rpc::Stage,
            Rpc::Apply,
            Rpc::Rollback,
            Rpc::UpgradeStep,
        ];
        for rpc in all {
            assert!(rpc.allowed_for(ControllerRole::Operator), "{rpc:?}");
            assert_eq!(
                rpc.allowed_for(ControllerRole::Observer),
                matches!(rpc, Rpc::Info | Rpc::Status),
                "{rpc:?}"
            );
            assert_eq!(
                Rpc::from_path(&format!("/patchd.v1.Agent/{}", rpc.name())),
                Some(rpc)
            );
        }
        assert_eq!(Rpc::from_path("/patchd.v1.Agent/Other"), None);
    }

    #[test]
    fn a_request_without_a_client_certificate_is_unauthenticated() {
        let request = http::Request::builder()
            .uri("/patchd.v1.Agent/Info")
            .body(())
            .unwrap();
        assert_eq!(
            authorize(&request).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
