//! The fictitious register data, loaded from JSON files shipped in
//! `registry-mock/data/` (embedded in the binary; a config may point at
//! other files of the same shape).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// A person in the civil register (Melderegister and Personenstandsregister).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Person {
    /// The German IDNr (valid check digit).
    pub idnr: String,
    /// Family name.
    pub family_name: String,
    /// Given names.
    pub given_names: String,
    /// "F", "M" or "X".
    pub sex: String,
    /// ISO 8601 date.
    pub date_of_birth: String,
    /// Place of birth.
    pub place_of_birth: String,
    /// The registry office (Standesamt) that recorded the birth.
    pub registry_office: String,
    /// The birth register entry number.
    pub birth_register_number: String,
    /// Mother's name.
    pub mother: String,
    /// Father's name.
    pub father: String,
    /// ISO 3166-1 nationality.
    pub nationality: String,
    /// Registered main residence.
    pub address: Address,
    /// Registered at this address since (ISO 8601 date).
    pub registered_since: String,
    /// A blocking notice (Auskunftssperre): the register refuses to release
    /// data about this person.
    pub information_block: bool,
}

/// A postal address.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Address {
    /// Street.
    pub street: String,
    /// House number.
    pub house_number: String,
    /// Postal code.
    pub postal_code: String,
    /// City.
    pub city: String,
    /// Amtlicher Gemeindeschlüssel.
    pub municipality_key: String,
    /// ISO 3166-2 state code.
    pub state: String,
}

/// The civil register file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CivilData {
    /// The register's name.
    pub register: String,
    /// The persons.
    pub persons: Vec<Person>,
}

/// A vehicle in the vehicle register.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vehicle {
    /// The holder's IDNr.
    pub holder_idnr: String,
    /// The holder's name.
    pub holder_name: String,
    /// The licence plate, e.g. "B-AS 1990".
    pub licence_plate: String,
    /// Vehicle identification number.
    pub vin: String,
    /// Make.
    pub make: String,
    /// Model.
    pub model: String,
    /// First registration (ISO 8601 date).
    pub first_registration: String,
    /// Fuel.
    pub fuel: String,
    /// The registration office.
    pub registration_office: String,
}

/// The vehicle register file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VehicleData {
    /// The register's name.
    pub register: String,
    /// The vehicles.
    pub vehicles: Vec<Vehicle>,
}

/// A company in the commercial register.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Company {
    /// E.g. "F1103:HRB 123456".
    pub register_number: String,
    /// The register court.
    pub court: String,
    /// The company's name.
    pub name: String,
    /// Legal form.
    pub legal_form: String,
    /// Seat.
    pub seat: String,
    /// Share capital, where it has one.
    pub share_capital: Option<String>,
    /// Object of the company.
    pub object: String,
    /// Managing directors / owners.
    pub representatives: Vec<String>,
    /// Date of first entry.
    pub registered_on: String,
    /// "active", "in liquidation", ...
    pub status: String,
}

/// The business register file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusinessData {
    /// The register's name.
    pub register: String,
    /// The companies.
    pub companies: Vec<Company>,
}

/// The shipped civil register.
pub const CIVIL_JSON: &str = include_str!("../data/civil.json");
/// The shipped vehicle register.
pub const VEHICLE_JSON: &str = include_str!("../data/vehicle.json");
/// The shipped business register.
pub const BUSINESS_JSON: &str = include_str!("../data/business.json");

/// A data file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct DataError {
    /// The file (or "embedded").
    pub source_name: String,
    /// What is wrong.
    pub message: String,
}

/// Parses register data from JSON text.
pub fn parse<T: serde::de::DeserializeOwned>(
    source_name: &str,
    text: &str,
) -> Result<T, DataError> {
    serde_json::from_str(text).map_err(|e| DataError {
        source_name: source_name.to_owned(),
        message: format!("line {}, column {}: {e}", e.line(), e.column()),
    })
}

/// Reads register data from a JSON file.
pub fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError {
        source_name: path.display().to_string(),
        message: e.to_string(),
    })?;
    parse(&path.display().to_string(), &text)
}
