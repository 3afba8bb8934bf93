//! HTTP calls of upgrade steps and checks, made by `patchctl`: `http://`, or `https://` trusting the system roots
//! plus the registered cluster's CA (as hooks do, `crate::hooks`); no proxy, no redirects followed, at most
//! [`crate::hooks::MAX_ANSWER_BYTES`] of an answer read.

use crate::hooks::{MAX_ANSWER_BYTES, describe_reqwest_error, with_body};
use crate::tls_files::ControllerTls;
use crate::untrusted::escaped;
use patchd_runbook::HttpMethod;
use std::time::Duration;

/// How long one call may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// An answer with an accepted status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// Status.
    pub status: u16,
    /// Body (bounded).
    pub body: Vec<u8>,
}

/// The client of upgrade HTTP calls.
#[derive(Debug, Clone)]
pub struct HttpSteps {
    http: reqwest::Client,
}

impl HttpSteps {
    /// Trusting the system roots and `tls`'s cluster CA on `https://`.
    pub fn for_cluster(tls: &ControllerTls) -> Result<Self, String> {
        patchd_tls::install_crypto_provider();
        let roots = tls
            .ca_certs_der()
            .map_err(|error| format!("cannot read the cluster CA: {error}"))?
            .iter()
            .map(|der| reqwest::Certificate::from_der(der))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("bad cluster CA certificate: {error}"))?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .tls_certs_merge(roots)
            .build()
            .map_err(|error| format!("cannot build the HTTP client: {error}"))?;
        Ok(Self { http })
    }

    /// One call; the status must be `expect_status` (default: any 2xx).
    pub async fn call(
        &self,
        method: HttpMethod,
        url: &str,
        body: Option<&str>,
        expect_status: Option<u16>,
    ) -> Result<HttpAnswer, String> {
        let name = method.name();
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(format!(
                "{name} {url}: a step's URL starts with http:// or https://"
            ));
        }
        let wire_method = match method {
            HttpMethod::Get => reqwest::Method::GET,
            HttpMethod::Put => reqwest::Method::PUT,
            HttpMethod::Post => reqwest::Method::POST,
            HttpMethod::Delete => reqwest::Method::DELETE,
            HttpMethod::Patch => reqwest::Method::PATCH,
        };
        let mut request = self.http.request(wire_method, url).timeout(HTTP_TIMEOUT);
        if let Some(body) = body {
            request = with_body(request, body);
        }
        let failed =
            |error: reqwest::Error| format!("{name} {url}: {}", describe_reqwest_error(&error));
        let mut response = request.send().await.map_err(failed)?;
        let status = response.status().as_u16();
        let accepted = match expect_status {
            Some(expected) => status == expected,
            None => (200..300).contains(&status),
        };
        if !accepted {
            let expected = expect_status.map_or_else(|| "2xx".to_string(), |code| code.to_string());
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|value| value.to_str().ok())
                .map(|location| format!(" (redirect to `{}`, not followed)", escaped(location)))
                .unwrap_or_default();
            return Err(format!(
                "{name} {url}: HTTP {status}, expected {expected}{location}"
            ));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(failed)? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(format!(
                    "{name} {url}: the answer is larger than {MAX_ANSWER_BYTES} bytes, the most a step reads"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HttpAnswer { status, body })
    }
}
