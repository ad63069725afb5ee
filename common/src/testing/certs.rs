//! Certificates for TLS tests, made in the test (rcgen on `ring`): a throwaway CA, and server
//! certificates it signs for `localhost` and `127.0.0.1`, written as PEM files into a directory
//! that is removed with the CA.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

pub struct TestCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A server certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate's common name, to tell certificates apart.
    pub name: String,
}

impl TestCa {
    /// A new CA named `name` (its common name), in a fresh directory.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-certs-{}", super::unique_prefix()));
        std::fs::create_dir_all(&dir).expect("certificate dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("CA key");
        let pem = params.self_signed(&key).expect("self-sign the CA").pem();
        std::fs::write(dir.join("ca.pem"), &pem).expect("write ca.pem");
        Self { dir, issuer: Issuer::new(params, key), pem }
    }

    /// The CA certificate's file (PEM), what clients verify against.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn ca_pem(&self) -> &str {
        &self.pem
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A server certificate for `localhost` and `127.0.0.1` with common name `name`, written to
    /// `<name>.crt` and `<name>.key` in the CA's directory.
    pub fn server(&self, name: &str) -> ServerCert {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("server params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign the server certificate");
        let files = ServerCert {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
            name: name.to_owned(),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write the certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write the key");
        files
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
