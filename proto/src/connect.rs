//! How clients and workers reach a coordinator: the channel's TLS (rustls, optional), the bearer token each
//! call carries (`authorization: Bearer <token>` metadata, as gRPC's token-based authentication has it) and
//! the trace context of the caller's current span (W3C `traceparent` metadata, through OpenTelemetry's
//! global propagator: the coordinator's span of the call becomes its child), and how a coordinator that
//! stopped answering is noticed (HTTP/2 keepalive, [`answers`]). One definition for the CLI's clients, the
//! client library and the worker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How often a connection to a coordinator is checked with an HTTP/2 PING, idle or not, and
/// [`KEEPALIVE_TIMEOUT`] how long its answer may take before the connection is dropped and its calls fail
/// (UNAVAILABLE). A coordinator whose host froze, lost power or dropped off the network does not close its
/// connections: without the PINGs a call waiting for its reply (a worker's long poll for a task, a
/// `watch`) would wait for ever, and one still sending for the kernel's 15 minutes of retransmissions.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long a keepalive PING's answer may take ([`KEEPALIVE_INTERVAL`]).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a coordinator has to answer [`answers`]' health check.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The metadata key of the bearer token.
pub const AUTHORIZATION: &str = "authorization";

/// A channel whose every call carries the caller's token, if it has one.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// What a caller presents: its token and, for `https://` URLs, whom it trusts and its own certificate.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// The bearer token (a client's or a worker's, as the coordinator's auth configuration lists them).
    pub token: Option<String>,
    /// The certificate authority (PEM) that signed the coordinator's certificate; without one, an
    /// `https://` URL is refused (no system roots are built in).
    pub tls_ca: Option<PathBuf>,
    /// This caller's certificate and key (PEM), for a coordinator that asks workers for one (mutual TLS).
    pub tls_identity: Option<(PathBuf, PathBuf)>,
}

/// A [`Credentials`] problem, naming the flag or file at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialsError(pub String);

impl std::fmt::Display for CredentialsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CredentialsError {}

/// Largest file a secret (a token, a signing key) or a certificate is read from.
pub const MAX_SECRET_FILE_BYTES: u64 = 1 << 20;

/// The error for the file `path` of `flag`: `why` it cannot be used.
fn file_error(flag: &str, path: &Path, why: impl std::fmt::Display) -> CredentialsError {
    CredentialsError(format!("{flag}: {}: {why}", path.display()))
}

/// A TLS file a caller read: its path and its bytes.
type TlsFile<'a> = (&'a Path, &'a [u8]);

/// Checks a caller's TLS files as rustls takes them, so that a bad one is named, flag and file: `ca` (PEM,
/// `--tls-ca`) must hold a certificate a root store takes (others beside it are passed over, as tonic
/// passes them over), and `identity` (`--tls-cert`, `--tls-key`) a certificate chain and the private key
/// of its first certificate. tonic reads them only as it connects, and says no more than "transport
/// error".
fn check_tls(
    ca: TlsFile<'_>,
    identity: Option<(TlsFile<'_>, TlsFile<'_>)>,
) -> Result<(), CredentialsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certificates = |flag: &str, (path, pem): TlsFile<'_>| {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_error(flag, path, format!("not PEM certificates: {e}")))?;
        match certs.is_empty() {
            true => Err(file_error(flag, path, "no PEM certificate in it")),
            false => Ok(certs),
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    // as tonic takes a CA bundle: the certificates webpki can parse
    let (taken, _) = roots.add_parsable_certificates(certificates("tls_ca", ca)?);
    if taken == 0 {
        return Err(file_error("tls_ca", ca.0, "not a CA certificate in it"));
    }
    let Some((cert, key)) = identity else {
        return Ok(());
    };
    let chain = certificates("tls_cert", cert)?;
    let (key_path, key) = key;
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| file_error("tls_key", key_path, format!("no PEM private key: {e}")))?;
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| file_error("tls_ca", ca.0, e))?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(|e| {
        let why = format!("not the key of --tls-cert's certificate: {e}");
        file_error("tls_key", key_path, why)
    })?;
    Ok(())
}

/// The bytes of a file of secrets or certificates (`flag` names it in errors), at most
/// [`MAX_SECRET_FILE_BYTES`]: a file (or a link to one, as Kubernetes mounts Secrets) or a pipe (a shell's
/// `<(pass show farm)`); a device that never ends (`/dev/zero`) is refused at the bound.
fn read(flag: &str, path: &Path) -> Result<Vec<u8>, CredentialsError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| file_error(flag, path, e))?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        let why = format!("longer than {} MiB", MAX_SECRET_FILE_BYTES >> 20);
        return Err(file_error(flag, path, why));
    }
    Ok(bytes)
}

/// [`read`]'s bytes as text; not UTF-8 is an error naming `flag` and the file.
fn read_text(flag: &str, path: &Path) -> Result<String, CredentialsError> {
    String::from_utf8(read(flag, path)?).map_err(|_| file_error(flag, path, "not UTF-8"))
}

/// Secrets read from a file (`flag` names it in errors; Kubernetes mounts Secrets as files), one a line,
/// each starting with `prefix` (e.g. `whsec_`), trimmed; blank lines are left out. A line after the first
/// that does not start with `prefix` is refused: it is the rest of a key that a tool wrapped over two
/// lines, which would otherwise be cut short.
pub fn secrets_from_file(
    flag: &str,
    path: &Path,
    prefix: &str,
) -> Result<Vec<String>, CredentialsError> {
    let text = read_text(flag, path)?;
    // (line number, secret)
    let secrets: Vec<(usize, &str)> = (text.lines().map(str::trim).enumerate())
        .filter(|(_, l)| !l.is_empty())
        .collect();
    if secrets.is_empty() {
        return Err(file_error(flag, path, "empty"));
    }
    if let Some((n, _)) = (secrets.iter().skip(1)).find(|(_, l)| !l.starts_with(prefix)) {
        let why = format!(
            "line {} does not start with {prefix}: give each secret on one line (not wrapped)",
            n + 1
        );
        return Err(file_error(flag, path, why));
    }
    Ok(secrets.into_iter().map(|(_, s)| s.to_string()).collect())
}

impl Credentials {
    /// A token read from a file (`--token-file`; Kubernetes mounts Secrets as files): its first line,
    /// trimmed.
    pub fn token_from_file(path: &Path) -> Result<String, CredentialsError> {
        let text = read_text("token_file", path)?;
        let token = text.lines().next().unwrap_or("").trim().to_string();
        if token.is_empty() {
            return Err(file_error("token_file", path, "empty"));
        }
        Ok(token)
    }

    /// The endpoint of `url` (`http://` or `https://`), with TLS set up for `https://` and keepalive
    /// PINGs ([`KEEPALIVE_INTERVAL`]). The error does not repeat the URL: the caller names it.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, CredentialsError> {
        // without a scheme (`host:port`) the URI parses, and every connection fails as "transport error";
        // another scheme (ftp://) would be spoken to as http://
        let https = match url.split_once("://").map(|(s, _)| s.to_ascii_lowercase()) {
            Some(scheme) if scheme == "http" || scheme == "https" => scheme == "https",
            Some(scheme) => {
                return Err(CredentialsError(format!(
                    "the scheme is {scheme}://, not http:// nor https://"
                )))
            }
            None => {
                let url = shown_url(url);
                return Err(CredentialsError(format!(
                    "no scheme: http://{url}, or https://{url} with TLS"
                )));
            }
        };
        if shown_url(url) != url {
            return Err(CredentialsError(
                "a user or password in the URL is not used: a coordinator takes a token (--token-file, \
                 STYLEFARM_TOKEN)"
                    .into(),
            ));
        }
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| CredentialsError(format!("not a URI: {e}")))?
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if !https {
            if self.tls_ca.is_some() || self.tls_identity.is_some() {
                return Err(CredentialsError(
                    "TLS options given for a plain http:// URL (use https://)".into(),
                ));
            }
            return Ok(endpoint);
        }
        let Some(ca_path) = &self.tls_ca else {
            return Err(CredentialsError(
                "tls_ca: an https:// coordinator needs the CA that signed its certificate".into(),
            ));
        };
        let ca = read("tls_ca", ca_path)?;
        let identity = match &self.tls_identity {
            Some((cert, key)) => Some((read("tls_cert", cert)?, read("tls_key", key)?)),
            None => None,
        };
        let files = self.tls_identity.as_ref().zip(identity.as_ref());
        check_tls(
            (ca_path, &ca),
            files.map(|((cp, kp), (c, k))| {
                ((cp.as_path(), c.as_slice()), (kp.as_path(), k.as_slice()))
            }),
        )?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint
            .tls_config(tls)
            .map_err(|e| CredentialsError(format!("tls: {e}")))
    }

    /// The interceptor that adds the token to every call.
    pub fn bearer(&self) -> Result<Bearer, CredentialsError> {
        let value = self
            .token
            .as_ref()
            .map(|t| {
                format!("Bearer {t}").parse().map_err(|_| {
                    CredentialsError("token: only visible ASCII characters may be sent".into())
                })
            })
            .transpose()?;
        Ok(Bearer(value))
    }

    /// `channel` with the token on every call.
    pub fn authorize(&self, channel: Channel) -> Result<AuthChannel, CredentialsError> {
        Ok(InterceptedService::new(channel, self.bearer()?))
    }
}

/// Whether the coordinator behind `channel` answers a call within [`ANSWER_TIMEOUT`]: grpc.health.v1's
/// Check, whose reply, or a status a gRPC server sends (UNAUTHENTICATED for a token it refuses), shows a
/// live coordinator. Connecting proves nothing: the kernel of a frozen coordinator's host still accepts
/// connections, and a call on one would wait for the keepalive to fail it. Nor does any answer: a server
/// that is not a coordinator (an S3 or web server on that port) answers HTTP/2 without gRPC, which tonic
/// reports as INTERNAL (a protocol error) or UNIMPLEMENTED (a 404); every coordinator serves the health
/// check. The error says why not: no answer in time, the transport's error, or that the server does not
/// speak gRPC's health check.
pub async fn answers(channel: AuthChannel) -> Result<(), String> {
    use tonic::Code;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = health.check(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(ANSWER_TIMEOUT, check).await {
        Err(_) => Err(format!("no answer within {} s", ANSWER_TIMEOUT.as_secs())),
        Ok(Err(s))
            if matches!(
                s.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
            ) =>
        {
            Err(s.message().to_string())
        }
        // a server's answer, without a transport fault under it: HTTP, not gRPC's health check
        Ok(Err(s))
            if matches!(s.code(), Code::Internal | Code::Unimplemented)
                && std::error::Error::source(&s).is_none() =>
        {
            Err(format!(
                "not a stylefarm coordinator: it does not answer gRPC's health check ({})",
                s.message()
            ))
        }
        // an HTTP/2 fault (a connection reset as a coordinator stops, a server that is not HTTP/2)
        Ok(Err(s)) if s.code() == Code::Internal => Err(with_sources(&s)),
        Ok(_) => Ok(()),
    }
}

/// Adds `authorization: Bearer <token>` to each request (nothing without a token), and the current span's
/// trace context.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert(AUTHORIZATION, token.clone());
        }
        inject_trace_context(request.metadata_mut());
        Ok(request)
    }
}

/// Writes the current tracing span's OpenTelemetry context into `metadata` (`traceparent`, `tracestate`)
/// with the global propagator; nothing when no propagator is installed or no span is current.
pub fn inject_trace_context(metadata: &mut tonic::metadata::MetadataMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    struct Injector<'a>(&'a mut tonic::metadata::MetadataMap);
    impl opentelemetry::propagation::Injector for Injector<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
                value.parse(),
            ) {
                self.0.insert(key, value);
            }
        }
    }
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut Injector(metadata));
    });
}

/// The OpenTelemetry context that a request's headers carry (`traceparent`), read with the global
/// propagator: the parent of the server's span of the call.
pub fn extract_trace_context(headers: &http::HeaderMap) -> opentelemetry::Context {
    struct Extractor<'a>(&'a http::HeaderMap);
    impl opentelemetry::propagation::Extractor for Extractor<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(http::HeaderName::as_str).collect()
        }
    }
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extractor(headers)))
}

/// An error and its sources, each after a colon, as anyhow's `{:#}` shows them: a connection's "transport
/// error" alone does not say that the certificate's issuer is unknown or the host refused.
pub fn with_sources(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = e.to_string();
        // a source whose text its error already shows adds nothing
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = e.source();
    }
    text
}

/// `url` as errors and logs show it: a user and password in it (`http://user:pw@host`) said as `***@`,
/// so that a secret put there is not printed.
pub fn shown_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            return format!("{scheme}://***@{}", &rest[at + 1..]);
        }
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A user and password in a coordinator's URL are said as `***@`, and refused: a coordinator takes a
    /// token, never a secret from the URL.
    #[test]
    fn a_url_s_password_is_never_shown_and_is_refused() {
        assert_eq!(
            shown_url("http://u:secret@farm:7700/x"),
            "http://***@farm:7700/x"
        );
        assert_eq!(shown_url("https://farm:7700"), "https://farm:7700");
        assert_eq!(shown_url("http://farm:7700/a@b"), "http://farm:7700/a@b");
        let e = Credentials::default()
            .endpoint("http://u:secret@farm:7700")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a user or password in the URL is not used") && !e.contains("secret"),
            "{e}"
        );
    }

    #[test]
    fn https_needs_a_ca_and_plain_http_takes_no_tls_options() {
        let none = Credentials::default();
        assert!(none.endpoint("http://127.0.0.1:7700").is_ok());
        let e = none.endpoint("https://farm:7700").unwrap_err();
        assert!(e.0.starts_with("tls_ca:"), "{e}");
        let tls = Credentials {
            tls_ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        assert!(tls
            .endpoint("http://farm:7700")
            .unwrap_err()
            .0
            .contains("https://"));
        assert!(tls
            .endpoint("https://farm:7700")
            .unwrap_err()
            .0
            .starts_with("tls_ca: /nonexistent"));
        let bad = Credentials {
            token: Some("line\nbreak".into()),
            ..Default::default()
        };
        assert!(bad.bearer().unwrap_err().0.starts_with("token:"));
    }

    /// A URL without http:// or https:// is refused at once, saying what to write (it parsed, and every
    /// connection failed as "transport error"; ftp:// was spoken to as http://).
    #[test]
    fn a_coordinator_url_needs_http_or_https() {
        let none = Credentials::default();
        let e = none.endpoint("127.0.0.1:7700").unwrap_err().0;
        assert!(e.contains("no scheme: http://127.0.0.1:7700"), "{e}");
        let e = none.endpoint("ftp://127.0.0.1:7700").unwrap_err().0;
        assert!(e.contains("ftp://"), "{e}");
        assert!(none.endpoint("notaurl").is_err());
        assert!(none.endpoint("HTTP://127.0.0.1:7700").is_ok());
    }

    #[test]
    fn an_error_is_shown_with_its_sources() {
        let io = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        #[derive(Debug)]
        struct Transport(std::io::Error);
        impl std::fmt::Display for Transport {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("transport error")
            }
        }
        impl std::error::Error for Transport {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        assert_eq!(
            with_sources(&Transport(io)),
            "transport error: invalid peer certificate: UnknownIssuer"
        );
    }
}
