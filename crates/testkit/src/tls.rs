//! A throw-away certificate authority created at test time.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, date_time_ymd,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A test CA plus one leaf certificate (for `localhost`, `127.0.0.1` and `::1`) signed by it.
///
/// The CA certificate is also written to `ca.pem` in a private temporary directory (removed when
/// the `TestCa` is dropped) so it can be handed to programs via `SSL_CERT_FILE` or an extra-CA
/// option.
pub struct TestCa {
    ca_cert_pem: String,
    ca_cert_der: CertificateDer<'static>,
    ca_key_pem: String,
    leaf_cert_pem: String,
    leaf_cert_der: CertificateDer<'static>,
    leaf_key_der: Vec<u8>,
    leaf_key_pem: String,
    server_config: Arc<rustls::ServerConfig>,
    /// The same, asking every client for a certificate this CA issued.
    mutual_config: Arc<rustls::ServerConfig>,
    /// A client certificate this CA issued, and its key (PEM files in `_dir`).
    client_cert_path: PathBuf,
    client_key_path: PathBuf,
    ca_pem_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa").field("ca_pem_path", &self.ca_pem_path).finish_non_exhaustive()
    }
}

/// The aws-lc-rs provider, explicitly: never rely on a process-wide default provider.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl TestCa {
    /// A CA and a currently valid leaf certificate.
    pub fn new() -> anyhow::Result<TestCa> {
        Self::build(false)
    }

    /// A CA and a leaf certificate whose validity ended in 2020 (handshakes must fail verification).
    pub fn expired() -> anyhow::Result<TestCa> {
        Self::build(true)
    }

    fn build(expired: bool) -> anyhow::Result<TestCa> {
        // --- CA ---
        let ca_key = KeyPair::generate().context("generating CA key")?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = rcgen::DistinguishedName::new();
        ca_params.distinguished_name.push(DnType::CommonName, "dlsession test CA");
        ca_params.distinguished_name.push(DnType::OrganizationName, "dlsession testkit");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        ca_params.not_before = date_time_ymd(2015, 1, 1);
        ca_params.not_after = date_time_ymd(2099, 12, 31);
        let ca_cert = ca_params.self_signed(&ca_key).context("self-signing CA")?;
        let issuer = Issuer::new(ca_params, &ca_key);

        // --- leaf ---
        let leaf_key = KeyPair::generate().context("generating leaf key")?;
        let mut leaf_params = CertificateParams::new(vec!["localhost".to_owned()]).context("leaf params")?;
        leaf_params.subject_alt_names.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        leaf_params.subject_alt_names.push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        leaf_params.distinguished_name = rcgen::DistinguishedName::new();
        leaf_params.distinguished_name.push(DnType::CommonName, "localhost");
        leaf_params.is_ca = IsCa::ExplicitNoCa;
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf_params.use_authority_key_identifier_extension = true;
        if expired {
            leaf_params.not_before = date_time_ymd(2019, 1, 1);
            leaf_params.not_after = date_time_ymd(2020, 1, 1);
        } else {
            leaf_params.not_before = date_time_ymd(2015, 1, 1);
            leaf_params.not_after = date_time_ymd(2099, 12, 31);
        }
        let leaf_cert = leaf_params.signed_by(&leaf_key, &issuer).context("signing leaf")?;

        let leaf_key_der = leaf_key.serialize_der();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key_der.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(vec![leaf_cert.der().clone()], key)
            .context("server certificate")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        // --- a client certificate, and a server that wants one ---
        let client_key = KeyPair::generate().context("generating client key")?;
        let mut client_params = CertificateParams::new(Vec::<String>::new()).context("client params")?;
        client_params.distinguished_name = rcgen::DistinguishedName::new();
        client_params.distinguished_name.push(DnType::CommonName, "dlsession test client");
        client_params.is_ca = IsCa::ExplicitNoCa;
        client_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        client_params.use_authority_key_identifier_extension = true;
        client_params.not_before = date_time_ymd(2015, 1, 1);
        client_params.not_after = date_time_ymd(2099, 12, 31);
        let client_cert = client_params.signed_by(&client_key, &issuer).context("signing client certificate")?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).context("client CA")?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .context("client verifier")?;
        let mut mutual = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![leaf_cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key_der.clone())),
            )
            .context("server certificate")?;
        mutual.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let dir = tempfile::Builder::new().prefix("dlsession-testca-").tempdir().context("tempdir")?;
        let client_cert_path = dir.path().join("client.pem");
        let client_key_path = dir.path().join("client-key.pem");
        std::fs::write(&client_cert_path, client_cert.pem()).context("writing client.pem")?;
        std::fs::write(&client_key_path, client_key.serialize_pem()).context("writing client-key.pem")?;
        let ca_pem_path = dir.path().join("ca.pem");
        let ca_cert_pem = ca_cert.pem();
        std::fs::write(&ca_pem_path, &ca_cert_pem).context("writing ca.pem")?;

        Ok(TestCa {
            ca_cert_der: ca_cert.der().clone(),
            ca_cert_pem,
            ca_key_pem: ca_key.serialize_pem(),
            leaf_cert_pem: leaf_cert.pem(),
            leaf_cert_der: leaf_cert.der().clone(),
            leaf_key_pem: leaf_key.serialize_pem(),
            leaf_key_der,
            server_config: Arc::new(config),
            mutual_config: Arc::new(mutual),
            client_cert_path,
            client_key_path,
            ca_pem_path,
            _dir: dir,
        })
    }

    /// Path of a PEM file holding the CA certificate.
    pub fn ca_pem_path(&self) -> &Path {
        &self.ca_pem_path
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca_cert_pem.clone()
    }

    /// The CA certificate, DER (handy for a `rustls::RootCertStore`).
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_cert_der.clone()
    }

    /// The CA private key, PEM (PKCS#8).
    pub fn ca_key_pem(&self) -> String {
        self.ca_key_pem.clone()
    }

    /// The leaf (server) certificate, PEM.
    pub fn leaf_pem(&self) -> String {
        self.leaf_cert_pem.clone()
    }

    /// The leaf (server) certificate, DER.
    pub fn leaf_der(&self) -> CertificateDer<'static> {
        self.leaf_cert_der.clone()
    }

    /// The leaf private key, PEM (PKCS#8).
    pub fn leaf_key_pem(&self) -> String {
        self.leaf_key_pem.clone()
    }

    /// The leaf private key, DER (PKCS#8).
    pub fn leaf_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key_der.clone()))
    }

    /// A rustls server configuration presenting the leaf certificate, ALPN `h2` then `http/1.1`.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.server_config)
    }

    /// A server configuration that also wants a client certificate this CA issued.
    pub fn mutual_server_config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.mutual_config)
    }

    /// PEM files of a client certificate this CA issued and of its key.
    pub fn client_identity(&self) -> (&Path, &Path) {
        (&self.client_cert_path, &self.client_key_path)
    }

    /// A rustls client configuration trusting only this CA, ALPN `h2` then `http/1.1`.
    pub fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        self.client_config_with_alpn(&[b"h2", b"http/1.1"])
    }

    /// A rustls client configuration trusting only this CA, offering the given ALPN protocols.
    pub fn client_config_with_alpn(&self, alpn: &[&[u8]]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der()).context("adding CA to root store")?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}
