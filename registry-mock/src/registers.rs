//! The three sample registers as one [`Connector`]: which evidence types
//! each serves, how a subject is looked up, and the payloads in the formats
//! registers use (XML for civil-status and commercial-register extracts,
//! JSON for residence and vehicle data).

use std::collections::HashMap;
use std::fmt::Write as _;

use onceonly_connector_sdk::proto::{EvidenceParameter, EvidenceTypeInfo, SubjectIdScheme};
use onceonly_connector_sdk::{
    Connector, EvidencePayload, EvidenceRequest, ProvideError, evidence_type,
};
use serde_json::json;

use crate::data::{self, BusinessData, CivilData, Company, DataError, Person, VehicleData};
use crate::faults::Faults;

/// Which register a mock serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RegisterKind {
    /// Civil register: birth certificates and proof of residence, by IDNr.
    Civil,
    /// Vehicle register: vehicle registrations by holder IDNr (and plate).
    Vehicle,
    /// Commercial register: extracts by register number.
    Business,
}

impl RegisterKind {
    /// The connector id the mock's certificate carries by convention.
    pub fn default_connector_id(self) -> &'static str {
        match self {
            RegisterKind::Civil => "civil-register",
            RegisterKind::Vehicle => "vehicle-register",
            RegisterKind::Business => "business-register",
        }
    }
}

enum Records {
    Civil(HashMap<String, Person>),
    Vehicle(Vec<data::Vehicle>),
    Business(HashMap<String, Company>),
}

/// A mock register: real connector, fictitious data, optional faults.
pub struct MockRegister {
    kind: RegisterKind,
    name: String,
    records: Records,
    faults: Faults,
}

impl MockRegister {
    /// A register with the data shipped in the crate.
    pub fn embedded(kind: RegisterKind) -> Result<Self, DataError> {
        let text = match kind {
            RegisterKind::Civil => data::CIVIL_JSON,
            RegisterKind::Vehicle => data::VEHICLE_JSON,
            RegisterKind::Business => data::BUSINESS_JSON,
        };
        Self::from_json(kind, "embedded data", text)
    }

    /// A register with data from a file of the shipped shape.
    pub fn from_file(kind: RegisterKind, path: &std::path::Path) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError {
            source_name: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_json(kind, &path.display().to_string(), &text)
    }

    fn from_json(kind: RegisterKind, source: &str, text: &str) -> Result<Self, DataError> {
        let (name, records) = match kind {
            RegisterKind::Civil => {
                let civil: CivilData = data::parse(source, text)?;
                let persons = civil
                    .persons
                    .into_iter()
                    .map(|p| (p.idnr.clone(), p))
                    .collect();
                (civil.register, Records::Civil(persons))
            }
            RegisterKind::Vehicle => {
                let vehicles: VehicleData = data::parse(source, text)?;
                (vehicles.register, Records::Vehicle(vehicles.vehicles))
            }
            RegisterKind::Business => {
                let business: BusinessData = data::parse(source, text)?;
                let companies = business
                    .companies
                    .into_iter()
                    .map(|c| (c.register_number.clone(), c))
                    .collect();
                (business.register, Records::Business(companies))
            }
        };
        Ok(MockRegister {
            kind,
            name,
            records,
            faults: Faults::default(),
        })
    }

    /// Adds latency, failures or refusals.
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Which register this is.
    pub fn kind(&self) -> RegisterKind {
        self.kind
    }

    /// The subjects the register holds (IDNrs or register numbers), sorted:
    /// what a demo can ask for.
    pub fn subjects(&self) -> Vec<String> {
        let mut subjects: Vec<String> = match &self.records {
            Records::Civil(persons) => persons.keys().cloned().collect(),
            Records::Vehicle(vehicles) => vehicles.iter().map(|v| v.holder_idnr.clone()).collect(),
            Records::Business(companies) => companies.keys().cloned().collect(),
        };
        subjects.sort();
        subjects.dedup();
        subjects
    }

    fn lookup(&self, request: &EvidenceRequest) -> Result<EvidencePayload, ProvideError> {
        let subject = &request.subject.value;
        match (&self.records, request.evidence_type.as_str()) {
            (Records::Civil(persons), evidence) => {
                let person = match request.subject.scheme {
                    SubjectIdScheme::Eidas => match_person(persons, request)?,
                    _ => persons.get(subject).ok_or(ProvideError::SubjectNotFound)?,
                };
                if person.information_block {
                    return Err(ProvideError::SubjectBlocked(
                        "a blocking notice (Auskunftssperre) is registered for this person".into(),
                    ));
                }
                match evidence {
                    "birth-certificate" => Ok(EvidencePayload::xml(birth_certificate_xml(person))),
                    "proof-of-residence" => {
                        if let Some(jurisdiction) = &request.jurisdiction
                            && jurisdiction != &person.address.state
                        {
                            return Err(ProvideError::SubjectNotFound);
                        }
                        Ok(EvidencePayload::json(residence_json(person)))
                    }
                    other => Err(ProvideError::EvidenceTypeNotServed(other.to_owned())),
                }
            }
            (Records::Vehicle(vehicles), "vehicle-registration") => {
                let plate = request.parameters.get("licence_plate");
                let held: Vec<&data::Vehicle> = vehicles
                    .iter()
                    .filter(|v| &v.holder_idnr == subject)
                    .filter(|v| {
                        plate
                            .is_none_or(|p| normalise_plate(p) == normalise_plate(&v.licence_plate))
                    })
                    .collect();
                if held.is_empty() {
                    return Err(ProvideError::SubjectNotFound);
                }
                Ok(EvidencePayload::json(vehicles_json(&held)))
            }
            (Records::Business(companies), "commercial-register-extract") => {
                let company = companies
                    .get(subject)
                    .ok_or(ProvideError::SubjectNotFound)?;
                Ok(EvidencePayload::xml(register_extract_xml(company)))
            }
            (_, other) => Err(ProvideError::EvidenceTypeNotServed(other.to_owned())),
        }
    }
}

impl Connector for MockRegister {
    fn evidence_types(&self) -> Vec<EvidenceTypeInfo> {
        use SubjectIdScheme::{DeCommercialRegister, DeIdnr, Eidas};
        let matched_on = |name: &str, description: &str| EvidenceParameter {
            name: name.into(),
            description: description.into(),
            required: false,
        };
        match self.kind {
            RegisterKind::Civil => vec![
                EvidenceTypeInfo {
                    description:
                        "Birth certificate (Geburtsurkunde) from the civil status register; by IDNr, or by eIDAS identifier with the person's family name and date of birth (EU requests)".into(),
                    parameters: vec![
                        matched_on("family_name", "with an eIDAS identifier: the family name, as in the register"),
                        matched_on("given_names", "with an eIDAS identifier: the given names (optional)"),
                        matched_on("date_of_birth", "with an eIDAS identifier: YYYY-MM-DD"),
                    ],
                    ..evidence_type(
                        "birth-certificate",
                        "Birth certificate",
                        &["application/xml"],
                        &[DeIdnr, Eidas],
                    )
                },
                EvidenceTypeInfo {
                    description: "Proof of registered main residence (Meldebescheinigung)".into(),
                    jurisdictions: vec![
                        "DE-BE".into(),
                        "DE-BY".into(),
                        "DE-HH".into(),
                        "DE-NW".into(),
                    ],
                    ..evidence_type(
                        "proof-of-residence",
                        "Proof of residence",
                        &["application/json"],
                        &[DeIdnr],
                    )
                },
            ],
            RegisterKind::Vehicle => vec![EvidenceTypeInfo {
                description:
                    "Vehicles registered to a holder (Zulassungsbescheinigung Teil I data)".into(),
                parameters: vec![EvidenceParameter {
                    name: "licence_plate".into(),
                    description: "select one vehicle by its plate, e.g. \"B-AS 1990\"".into(),
                    required: false,
                }],
                ..evidence_type(
                    "vehicle-registration",
                    "Vehicle registration",
                    &["application/json"],
                    &[DeIdnr],
                )
            }],
            RegisterKind::Business => vec![EvidenceTypeInfo {
                description: "Current extract from the commercial register (Handelsregisterauszug)"
                    .into(),
                ..evidence_type(
                    "commercial-register-extract",
                    "Commercial register extract",
                    &["application/xml"],
                    &[DeCommercialRegister],
                )
            }],
        }
    }

    fn register_name(&self) -> String {
        self.name.clone()
    }

    async fn provide(&self, request: EvidenceRequest) -> Result<EvidencePayload, ProvideError> {
        self.faults.apply(&request.subject.value).await?;
        tracing::debug!(exchange_id = %request.exchange_id, "register lookup");
        self.lookup(&request)
    }
}

/// The person an eIDAS identifier names, matched on what the requesting
/// member state sent with it (`family_name`, `given_names` and
/// `date_of_birth`, all three): the register keeps no eIDAS identifiers.
/// No match, or several, is said as such; never a guess.
fn match_person<'a>(
    persons: &'a HashMap<String, Person>,
    request: &EvidenceRequest,
) -> Result<&'a Person, ProvideError> {
    // All three, none blank: fewer would let a caller find people by
    // family name and birth date alone.
    let wanted = |name: &str| {
        request
            .parameters
            .get(name)
            .map(|v| v.trim().to_lowercase())
            .filter(|v| !v.is_empty())
    };
    let (Some(family_name), Some(given_names), Some(date_of_birth)) = (
        wanted("family_name"),
        wanted("given_names"),
        wanted("date_of_birth"),
    ) else {
        return Err(ProvideError::SubjectNotFound);
    };
    let mut matches = persons.values().filter(|p| {
        p.family_name.to_lowercase() == family_name
            && p.given_names.to_lowercase() == given_names
            && p.date_of_birth == date_of_birth
    });
    match (matches.next(), matches.next()) {
        (Some(person), None) => Ok(person),
        (None, _) => Err(ProvideError::SubjectNotFound),
        (Some(_), Some(_)) => Err(ProvideError::AmbiguousSubject),
    }
}

fn normalise_plate(plate: &str) -> String {
    plate
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_uppercase)
        .collect()
}

/// Escapes text for XML element content and attributes.
pub use onceonly_proto::xml::escape as xml_escape;

fn element(out: &mut String, indent: usize, name: &str, value: &str) {
    let _ = writeln!(out, "{:indent$}<{name}>{}</{name}>", "", xml_escape(value));
}

fn birth_certificate_xml(person: &Person) -> String {
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    xml.push_str("<Geburtsurkunde xmlns=\"urn:onceonly:example:personenstand:1\">\n");
    element(&mut xml, 2, "Standesamt", &person.registry_office);
    element(&mut xml, 2, "Registernummer", &person.birth_register_number);
    xml.push_str("  <Kind>\n");
    element(&mut xml, 4, "Familienname", &person.family_name);
    element(&mut xml, 4, "Vornamen", &person.given_names);
    element(&mut xml, 4, "Geschlecht", &person.sex);
    element(&mut xml, 4, "Geburtsdatum", &person.date_of_birth);
    element(&mut xml, 4, "Geburtsort", &person.place_of_birth);
    xml.push_str("  </Kind>\n");
    element(&mut xml, 2, "Mutter", &person.mother);
    element(&mut xml, 2, "Vater", &person.father);
    xml.push_str("</Geburtsurkunde>\n");
    xml
}

fn residence_json(person: &Person) -> String {
    json!({
        "type": "proof-of-residence",
        "person": {
            "family_name": person.family_name,
            "given_names": person.given_names,
            "date_of_birth": person.date_of_birth,
            "nationality": person.nationality,
        },
        "main_residence": person.address,
        "registered_since": person.registered_since,
        "issuing_authority": format!("Meldebehörde {}", person.address.city),
    })
    .to_string()
}

fn vehicles_json(vehicles: &[&data::Vehicle]) -> String {
    json!({
        "type": "vehicle-registration",
        "holder": vehicles.first().map(|v| &v.holder_name),
        "vehicles": vehicles.iter().map(|v| json!({
            "licence_plate": v.licence_plate,
            "vin": v.vin,
            "make": v.make,
            "model": v.model,
            "first_registration": v.first_registration,
            "fuel": v.fuel,
            "registration_office": v.registration_office,
        })).collect::<Vec<_>>(),
    })
    .to_string()
}

fn register_extract_xml(company: &Company) -> String {
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    xml.push_str("<Registerauszug xmlns=\"urn:onceonly:example:handelsregister:1\">\n");
    element(&mut xml, 2, "Registergericht", &company.court);
    element(&mut xml, 2, "Registernummer", &company.register_number);
    element(&mut xml, 2, "Firma", &company.name);
    element(&mut xml, 2, "Rechtsform", &company.legal_form);
    element(&mut xml, 2, "Sitz", &company.seat);
    if let Some(capital) = &company.share_capital {
        element(&mut xml, 2, "Kapital", capital);
    }
    element(&mut xml, 2, "Gegenstand", &company.object);
    xml.push_str("  <Vertretung>\n");
    for representative in &company.representatives {
        element(&mut xml, 4, "Person", representative);
    }
    xml.push_str("  </Vertretung>\n");
    element(&mut xml, 2, "Ersteintragung", &company.registered_on);
    element(&mut xml, 2, "Status", &company.status);
    xml.push_str("</Registerauszug>\n");
    xml
}

#[cfg(test)]
mod tests {
    use super::*;
    use onceonly_proto::validate;

    #[test]
    fn every_shipped_identifier_is_well_formed() {
        for kind in [RegisterKind::Civil, RegisterKind::Vehicle] {
            let register = MockRegister::embedded(kind).expect("data parses");
            for idnr in register.subjects() {
                assert_eq!(validate::idnr(&idnr), Ok(()), "{idnr}");
            }
        }
        let business = MockRegister::embedded(RegisterKind::Business).expect("data parses");
        assert!(!business.subjects().is_empty());
        for number in business.subjects() {
            assert_eq!(
                validate::commercial_register_number(&number),
                Ok(()),
                "{number}"
            );
        }
    }

    fn eidas_request(parameters: &[(&str, &str)]) -> EvidenceRequest {
        EvidenceRequest {
            exchange_id: "x".into(),
            evidence_type: "birth-certificate".into(),
            subject: onceonly_connector_sdk::Subject {
                scheme: SubjectIdScheme::Eidas,
                value: "DE/AT/7f3c9e21a4b8".into(),
            },
            jurisdiction: None,
            purpose: "oots:T1".into(),
            legal_basis: "Art. 14 VO (EU) 2018/1724".into(),
            requester_id: "spiffe://onceonly.test/authority/oots-bridge".into(),
            parameters: parameters
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            deadline: None,
            ticket: None,
            signed_request: None,
        }
    }

    #[test]
    fn a_person_named_by_eidas_identifier_is_matched_on_name_and_birth_date_never_guessed() {
        let civil = MockRegister::embedded(RegisterKind::Civil).expect("civil");
        let found = civil
            .lookup(&eidas_request(&[
                ("family_name", "schneider"),
                ("given_names", "Anna Lena"),
                ("date_of_birth", "1990-03-14"),
            ]))
            .expect("Anna");
        assert!(String::from_utf8_lossy(&found.bytes).contains("Schneider"));
        for missing in [
            &[("family_name", "Schneider")][..],
            &[
                ("family_name", "Schneider"),
                ("date_of_birth", "1990-03-14"),
            ],
            &[
                ("family_name", "Schneider"),
                ("date_of_birth", "1990-03-14"),
                ("given_names", " "),
            ],
            &[
                ("family_name", "Schneider"),
                ("date_of_birth", "1990-03-15"),
                ("given_names", "Anna Lena"),
            ],
            &[
                ("family_name", "Schneider"),
                ("date_of_birth", "1990-03-14"),
                ("given_names", "Petra"),
            ],
        ] {
            assert!(matches!(
                civil.lookup(&eidas_request(missing)),
                Err(ProvideError::SubjectNotFound)
            ));
        }
        // Two of one name and birth date: said, not guessed.
        let twins = r#"{"register": "twins", "persons": [PERSON_A, PERSON_B]}"#
            .replace("PERSON_A", &person_json("82281866209", "Jonas"))
            .replace("PERSON_B", &person_json("21641045750", "Jonas"));
        let register = MockRegister::from_json(RegisterKind::Civil, "twins", &twins).expect("data");
        let jonas = [
            ("family_name", "Weber"),
            ("given_names", "Jonas"),
            ("date_of_birth", "2001-06-01"),
        ];
        assert!(matches!(
            register.lookup(&eidas_request(&jonas)),
            Err(ProvideError::AmbiguousSubject)
        ));
        let lukas = [jonas[0], ("given_names", "Lukas"), jonas[2]];
        assert!(matches!(
            register.lookup(&eidas_request(&lukas)),
            Err(ProvideError::SubjectNotFound)
        ));
    }

    fn person_json(idnr: &str, given: &str) -> String {
        format!(
            r#"{{"idnr": "{idnr}", "family_name": "Weber", "given_names": "{given}", "sex": "M", "date_of_birth": "2001-06-01", "place_of_birth": "Berlin", "registry_office": "Berlin-Mitte", "birth_register_number": "G 1/2001", "mother": "M", "father": "F", "nationality": "DE", "address": {{"street": "S", "house_number": "1", "postal_code": "10115", "city": "Berlin", "municipality_key": "11000000", "state": "DE-BE"}}, "registered_since": "2001-06-01", "information_block": false}}"#
        )
    }

    #[test]
    fn vehicle_holders_exist_in_the_civil_register() {
        let civil = MockRegister::embedded(RegisterKind::Civil).expect("civil");
        let vehicle = MockRegister::embedded(RegisterKind::Vehicle).expect("vehicle");
        let people = civil.subjects();
        for holder in vehicle.subjects() {
            assert!(
                people.contains(&holder),
                "{holder} holds a car but is not in the civil register"
            );
        }
    }

    #[test]
    fn xml_is_escaped() {
        assert_eq!(
            xml_escape("A & B <GmbH> \"x\""),
            "A &amp; B &lt;GmbH&gt; &quot;x&quot;"
        );
    }

    #[test]
    fn plates_compare_without_spacing_or_case() {
        assert_eq!(normalise_plate("b-as 1990"), normalise_plate("B-AS 1990"));
        assert_ne!(normalise_plate("B-AS 1991"), normalise_plate("B-AS 1990"));
    }
}
