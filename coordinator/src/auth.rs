//! Who may call what. Clients and workers present bearer tokens (`authorization: Bearer <token>`), checked
//! by a tonic interceptor in front of each service: RenderService takes client tokens, each of which names
//! its tenant (a tenant sees, fetches and cancels only its own jobs), WorkerService takes worker tokens.
//! The listener can speak TLS (rustls), and can ask workers for a client certificate (mutual TLS). With no
//! token configured, every caller is the one default tenant, as on a single machine.
//!
//! A client token marked `operator` may also drain and undrain workers (DrainWorkers), which affects every
//! tenant; with no token configured, every caller may.
//!
//! Errors: a call without a token, with a malformed or an unknown one, or (mutual TLS) a worker call
//! without a verified certificate: UNAUTHENTICATED; a known token on the other service, or a client's that
//! is not an operator's on DrainWorkers: PERMISSION_DENIED; another tenant's job: NOT_FOUND, as a job that
//! does not exist.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use stylefarm_proto::connect::AUTHORIZATION;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::Error;

/// The tenant a client's token names: jobs belong to the tenant that submitted them. Put in each
/// RenderService request's extensions by the interceptor; the empty name when auth is off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Tenant(pub String);

impl Tenant {
    /// What a tenant's name may be, as errors say it.
    pub const NAME_RULE: &'static str = "1 to 64 letters, digits, '-', '_' or '.'";

    /// Whether `name` may name a tenant ([`Self::NAME_RULE`]).
    pub fn valid_name(name: &str) -> bool {
        (1..=64).contains(&name.len())
            && name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
    }
}

/// The tokens the coordinator accepts: from flags, their variables, or a TOML file ([`AuthConfig::load`]).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Client tokens, each with its tenant.
    #[serde(default, rename = "client")]
    pub clients: Vec<ClientToken>,
    /// Worker tokens.
    #[serde(default, rename = "worker")]
    pub workers: Vec<WorkerToken>,
}

/// A client token and the tenant it names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientToken {
    /// The tenant: 1 to 64 letters, digits, `-`, `_` or `.`.
    pub tenant: String,
    /// The token itself...
    #[serde(default)]
    pub token: Option<String>,
    /// ...or the file holding it (its first line), e.g. a mounted Kubernetes Secret.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The farm's operator: may also drain and undrain workers (DrainWorkers). Default false.
    #[serde(default)]
    pub operator: bool,
}

/// A worker token.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerToken {
    /// The token itself...
    #[serde(default)]
    pub token: Option<String>,
    /// ...or the file holding it (its first line).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// Shortest token accepted: a guessable one is no authentication.
pub const MIN_TOKEN_CHARS: usize = 16;

fn token_of(what: &str, token: &Option<String>, file: &Option<PathBuf>) -> Result<String, Error> {
    let token = match (token, file) {
        (Some(t), None) => t.clone(),
        (None, Some(path)) => stylefarm_proto::connect::Credentials::token_from_file(path)
            .map_err(|e| Error::invalid("auth", format!("{what}: {e}")))?,
        _ => {
            return Err(Error::invalid(
                "auth",
                format!("{what}: give either token or token_file"),
            ))
        }
    };
    if token.chars().count() < MIN_TOKEN_CHARS || !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Error::invalid(
            "auth",
            format!("{what}: a token is at least {MIN_TOKEN_CHARS} visible ASCII characters"),
        ));
    }
    Ok(token)
}

impl AuthConfig {
    /// Reads a TOML file of `[[client]]` (`tenant`, and `token` or `token_file`) and `[[worker]]`
    /// (`token` or `token_file`) tables. An error names the file and what is wrong.
    pub fn load(path: &Path) -> Result<AuthConfig, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::invalid("auth_file", format!("{}: {e}", path.display())))?;
        toml::from_str(&text)
            .map_err(|e| Error::invalid("auth_file", format!("{}: {e}", path.display())))
    }

    /// A client token from a flag: `TENANT:TOKEN`.
    pub fn parse_client(s: &str) -> Result<ClientToken, Error> {
        let (tenant, token) = s
            .split_once(':')
            .ok_or_else(|| Error::invalid("client_token", "expected TENANT:TOKEN"))?;
        Ok(ClientToken {
            tenant: tenant.to_string(),
            token: Some(token.to_string()),
            token_file: None,
            operator: false,
        })
    }

    /// Whether any token is configured: then every call needs one.
    pub fn enabled(&self) -> bool {
        !self.clients.is_empty() || !self.workers.is_empty()
    }

    /// The tokens by their sha256, checked: tenants well formed, tokens long enough, none listed twice.
    fn tokens(&self) -> Result<HashMap<[u8; 32], Role>, Error> {
        let mut out = HashMap::new();
        let mut add = |token: String, role: Role| {
            let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            match out.insert(digest, role) {
                None => Ok(()),
                Some(_) => Err(Error::invalid("auth", "a token is listed twice")),
            }
        };
        for (i, c) in self.clients.iter().enumerate() {
            if !Tenant::valid_name(&c.tenant) {
                return Err(Error::invalid(
                    "auth",
                    format!("client {i}: tenant '{}': {}", c.tenant, Tenant::NAME_RULE),
                ));
            }
            let token = token_of(
                &format!("client {i} ({})", c.tenant),
                &c.token,
                &c.token_file,
            )?;
            add(token, Role::Client(Tenant(c.tenant.clone()), c.operator))?;
        }
        for (i, w) in self.workers.iter().enumerate() {
            add(
                token_of(&format!("worker {i}"), &w.token, &w.token_file)?,
                Role::Worker,
            )?;
        }
        Ok(out)
    }
}

/// The listener's TLS: its certificate and key, and the CA whose client certificates it verifies.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// The coordinator's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA (PEM) of the client certificates it accepts; they are optional unless workers must show
    /// one ([`TlsConfig::require_worker_cert`]).
    pub client_ca: Option<PathBuf>,
    /// WorkerService calls need a client certificate signed by `client_ca` (mutual TLS for workers).
    pub require_worker_cert: bool,
}

impl TlsConfig {
    /// tonic's server config; an error names the flag whose file cannot be read, holds no PEM
    /// certificate, or (the key) is not the certificate's: checked here, since tonic reads them only
    /// once it serves, and says no more than "tls: transport error".
    pub(crate) fn server_config(&self) -> Result<ServerTlsConfig, Error> {
        self.rustls_server_config()?;
        if let Some(ca) = &self.client_ca {
            pem_certificates("tls_client_ca", ca)?;
        }
        let read = |flag: &'static str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| Error::invalid(flag, format!("{}: {e}", path.display())))
        };
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(
            read("tls_cert", &self.cert)?,
            read("tls_key", &self.key)?,
        ));
        match &self.client_ca {
            Some(ca) => {
                config = config
                    .client_ca_root(Certificate::from_pem(read("tls_client_ca", ca)?))
                    .client_auth_optional(true);
            }
            None if self.require_worker_cert => {
                return Err(Error::invalid(
                    "require_worker_cert",
                    "needs --tls-client-ca, the CA of the workers' certificates",
                ))
            }
            None => {}
        }
        Ok(config)
    }

    /// A rustls server config of the certificate and key alone, for the status page's HTTPS (browsers
    /// present no client certificate); an error names the flag whose file cannot be read or parsed.
    pub(crate) fn rustls_server_config(&self) -> Result<rustls::ServerConfig, Error> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::PrivateKeyDer;
        let chain = pem_certificates("tls_cert", &self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| Error::invalid("tls_key", format!("{}: {e}", self.key.display())))?;
        // the provider named, not the process default that a library's user may not have installed
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid("tls_cert", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| Error::invalid("tls_key", format!("{}: {e}", self.key.display())))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// The PEM certificates of file `path` (flag `flag`'s): at least one.
fn pem_certificates(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, Error> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::invalid(flag, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::invalid(
            flag,
            format!("{}: no PEM certificate in it", path.display()),
        ));
    }
    Ok(certs)
}

#[derive(Debug, Clone)]
enum Role {
    /// A client of the tenant; the bool: an operator's ([`ClientToken::operator`]).
    Client(Tenant, bool),
    Worker,
}

/// Put in a RenderService request's extensions when its caller is the farm's operator (an operator's
/// token, or any caller when auth is off): [`operator`].
#[derive(Debug, Clone, Copy)]
struct Operator;

/// The interceptors' shared state: the accepted tokens by digest.
#[derive(Clone)]
pub(crate) struct Gate {
    /// `None`: auth is off.
    tokens: Option<Arc<HashMap<[u8; 32], Role>>>,
    require_worker_cert: bool,
}

impl Gate {
    pub(crate) fn new(auth: &AuthConfig, tls: Option<&TlsConfig>) -> Result<Gate, Error> {
        Ok(Gate {
            tokens: auth
                .enabled()
                .then(|| auth.tokens().map(Arc::new))
                .transpose()?,
            require_worker_cert: tls.is_some_and(|t| t.require_worker_cert),
        })
    }

    /// Whether tokens are asked for.
    pub(crate) fn enabled(&self) -> bool {
        self.tokens.is_some()
    }

    /// The caller's role; `None` when auth is off.
    fn role(&self, request: &Request<()>) -> Result<Option<Role>, Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(None);
        };
        let value = request.metadata().get(AUTHORIZATION).ok_or_else(|| {
            Status::unauthenticated(
                "authorization: missing (send the metadata 'authorization: Bearer <token>'; the \
                 stylefarm commands: --token or STYLEFARM_TOKEN)",
            )
        })?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization: expected 'Bearer <token>'"))?;
        let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        tokens
            .get(&digest)
            .cloned()
            .map(Some)
            .ok_or_else(|| Status::unauthenticated("authorization: unknown token"))
    }

    /// RenderService's interceptor: a client token; its tenant goes into the request's extensions.
    pub(crate) fn clients(&self) -> impl tonic::service::Interceptor + Clone {
        let gate = self.clone();
        move |mut request: Request<()>| {
            let (tenant, operator) = match gate.role(&request)? {
                None => (Tenant::default(), true),
                Some(Role::Client(tenant, operator)) => (tenant, operator),
                Some(Role::Worker) => {
                    return Err(Status::permission_denied(
                        "authorization: a worker token cannot call stylefarm.v1.RenderService",
                    ))
                }
            };
            request.extensions_mut().insert(tenant);
            if operator {
                request.extensions_mut().insert(Operator);
            }
            Ok(request)
        }
    }

    /// WorkerService's interceptor: a worker token, and with mutual TLS for workers, a verified client
    /// certificate.
    pub(crate) fn workers(&self) -> impl tonic::service::Interceptor + Clone {
        let gate = self.clone();
        move |request: Request<()>| {
            if gate.require_worker_cert && request.peer_certs().is_none_or(|c| c.is_empty()) {
                return Err(Status::unauthenticated(
                    "tls: stylefarm.v1.WorkerService needs a client certificate signed by the \
                     coordinator's client CA",
                ));
            }
            match gate.role(&request)? {
                None | Some(Role::Worker) => Ok(request),
                Some(Role::Client(..)) => Err(Status::permission_denied(
                    "authorization: a client token cannot call stylefarm.v1.WorkerService",
                )),
            }
        }
    }
}

/// Whether `request`'s caller is the farm's operator ([`ClientToken::operator`]; anyone when auth is off):
/// PERMISSION_DENIED naming `what` when not.
pub(crate) fn operator<T>(request: &Request<T>, what: &str) -> Result<(), Status> {
    match request.extensions().get::<Operator>() {
        Some(Operator) => Ok(()),
        None => Err(Status::permission_denied(format!(
            "{what}: only an operator's token may (operator = true for its [[client]] in the auth file)"
        ))),
    }
}

/// The tenant the interceptor put in `request`'s extensions.
pub(crate) fn tenant<T>(request: &Request<T>) -> Tenant {
    request
        .extensions()
        .get::<Tenant>()
        .cloned()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn call(mut i: impl Interceptor, token: Option<&str>) -> Result<Tenant, tonic::Code> {
        let mut request = Request::new(());
        if let Some(t) = token {
            request
                .metadata_mut()
                .insert(AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        }
        i.call(request).map(|r| tenant(&r)).map_err(|s| s.code())
    }

    #[test]
    fn tokens_name_roles_and_tenants() {
        let auth = AuthConfig {
            clients: vec![AuthConfig::parse_client("alice:alice-token-0123456789").unwrap()],
            workers: vec![WorkerToken {
                token: Some("worker-token-0123456789".into()),
                token_file: None,
            }],
        };
        let gate = Gate::new(&auth, None).unwrap();
        let alice = Tenant("alice".into());
        assert_eq!(
            call(gate.clients(), Some("alice-token-0123456789")),
            Ok(alice)
        );
        assert_eq!(
            call(gate.clients(), None),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call(gate.clients(), Some("nope-nope-nope-nope")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call(gate.clients(), Some("worker-token-0123456789")),
            Err(tonic::Code::PermissionDenied)
        );
        assert!(call(gate.workers(), Some("worker-token-0123456789")).is_ok());
        assert_eq!(
            call(gate.workers(), Some("alice-token-0123456789")),
            Err(tonic::Code::PermissionDenied)
        );
        // auth off: everyone is the default tenant
        let open = Gate::new(&AuthConfig::default(), None).unwrap();
        assert_eq!(call(open.clients(), None), Ok(Tenant::default()));
        assert!(call(open.workers(), None).is_ok());
    }

    #[test]
    fn bad_configurations_are_refused_naming_what_is_wrong() {
        let short = AuthConfig {
            clients: vec![AuthConfig::parse_client("alice:short").unwrap()],
            ..Default::default()
        };
        let e = Gate::new(&short, None).err().unwrap().to_string();
        assert!(
            e.starts_with("auth: client 0 (alice): a token is at least"),
            "{e}"
        );
        let tenant = AuthConfig {
            clients: vec![AuthConfig::parse_client("a b:0123456789abcdef").unwrap()],
            ..Default::default()
        };
        assert!(Gate::new(&tenant, None)
            .err()
            .unwrap()
            .to_string()
            .contains("tenant 'a b'"));
        let twice = AuthConfig {
            clients: vec![
                AuthConfig::parse_client("a:0123456789abcdef").unwrap(),
                AuthConfig::parse_client("b:0123456789abcdef").unwrap(),
            ],
            ..Default::default()
        };
        assert!(Gate::new(&twice, None)
            .err()
            .unwrap()
            .to_string()
            .contains("twice"));
        assert!(AuthConfig::parse_client("no-colon").is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.toml");
        std::fs::write(dir.path().join("bob.token"), "bob-token-0123456789\n").unwrap();
        std::fs::write(
            &file,
            format!(
                "[[client]]\ntenant = \"bob\"\ntoken_file = \"{}\"\n\n[[worker]]\ntoken = \"w-0123456789abcdef\"\n",
                dir.path().join("bob.token").display()
            ),
        )
        .unwrap();
        let loaded = AuthConfig::load(&file).unwrap();
        let gate = Gate::new(&loaded, None).unwrap();
        assert_eq!(
            call(gate.clients(), Some("bob-token-0123456789")),
            Ok(Tenant("bob".into()))
        );
        std::fs::write(&file, "[[client]]\ntenant = \"bob\"\ntokn = \"x\"\n").unwrap();
        let e = AuthConfig::load(&file).unwrap_err().to_string();
        assert!(e.starts_with("auth_file:") && e.contains("tokn"), "{e}");
    }
}
