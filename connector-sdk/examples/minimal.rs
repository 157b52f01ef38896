//! The smallest useful connector: a dog-licence register keyed by IDNr.
//!
//! Run it against a PKI made with `onceonly-certs`:
//!
//! ```sh
//! onceonly-certs --dir pki issue --role connector --id dog-register
//! cargo run -p onceonly-connector-sdk --example minimal -- pki
//! ```

use onceonly_connector_sdk::proto::{EvidenceTypeInfo, SubjectIdScheme};
use onceonly_connector_sdk::{
    Connector, ConnectorServer, EvidencePayload, EvidenceRequest, ProvideError, evidence_type,
};

struct DogRegister;

impl Connector for DogRegister {
    fn evidence_types(&self) -> Vec<EvidenceTypeInfo> {
        let schemes = [SubjectIdScheme::DeIdnr];
        vec![evidence_type(
            "dog-licence",
            "Dog licence",
            &["application/json"],
            &schemes,
        )]
    }

    fn register_name(&self) -> String {
        "Hundesteuerregister Musterstadt".into()
    }

    async fn provide(&self, request: EvidenceRequest) -> Result<EvidencePayload, ProvideError> {
        tracing::info!(subject = %request.subject.value, "looking up dog licence");
        match request.subject.value.as_str() {
            "86095742719" => Ok(EvidencePayload::json(
                r#"{"licence":"HUND-0815","breed":"Dackel","paid_until":"2026-12-31"}"#,
            )),
            _ => Err(ProvideError::SubjectNotFound),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt::init();
    let pki = std::env::args().nth(1).unwrap_or_else(|| "pki".into());
    let pki = onceonly_certs::Pki::open(pki.as_ref())?;
    let tls = pki.tls_files(onceonly_certs::Role::Connector, "dog-register");
    let server = ConnectorServer::builder(DogRegister, tls)
        .listen("127.0.0.1:7199".parse()?)
        .allowed_broker("broker")
        .bind()
        .await?;
    println!("dog register listening on {}", server.local_addr());
    server.serve().await?;
    Ok(())
}
