//! `onceonly-certs`: create and manage the participant PKI.
//!
//! Exit codes: 0 success, 1 the operation failed (the message says why),
//! 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use onceonly_certs::inspect::CertificateSummary;
use onceonly_certs::pki::{self, InitOptions, IssueOptions, KeyAlgorithm, Pki};
use onceonly_certs::{Participant, Role};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Create and manage the onceonly participant PKI: a root CA per trust
/// domain and one certificate per participant, whose identity is the URI SAN
/// spiffe://<trust-domain>/<role>/<id>.
#[derive(Debug, Parser)]
#[command(name = "onceonly-certs", version)]
struct Cli {
    /// The PKI directory.
    #[arg(long, global = true, default_value = "pki", env = "ONCEONLY_PKI_DIR")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a root CA for a trust domain, an empty revocation list and the
    /// broker's certificate.
    Init {
        /// The SPIFFE trust domain, e.g. onceonly.test.
        #[arg(long, default_value = "onceonly.test")]
        trust_domain: String,
        /// Key algorithm for the CA and, by default, every participant.
        #[arg(long, value_enum, default_value_t = Algorithm::EcdsaP256)]
        key_algorithm: Algorithm,
        /// The organisation (O) in the subject of the CA's and of every
        /// certificate issued from this PKI, e.g. "Land Berlin".
        #[arg(long, default_value = pki::DEFAULT_ORGANISATION)]
        organisation: String,
        /// How long the CA is valid, e.g. "10y" or "3650days".
        #[arg(long, default_value = "10years", value_parser = humantime::parse_duration)]
        ca_validity: Duration,
        /// The broker's id.
        #[arg(long, default_value = "broker")]
        broker_id: String,
        /// A DNS name or IP address for the broker's server certificate;
        /// repeat for several (default: localhost, 127.0.0.1, ::1).
        #[arg(long = "broker-name")]
        broker_names: Vec<String>,
        /// How long the broker's certificate is valid.
        #[arg(long, default_value = "90days", value_parser = humantime::parse_duration)]
        validity: Duration,
        /// Overwrite an existing PKI in the directory.
        #[arg(long)]
        force: bool,
    },
    /// Issue a participant certificate and key: <dir>/<role>/<id>.pem and .key.
    Issue {
        /// authority, connector, auditor, portal, broker, admin or
        /// policy-admin (policy staff, in the console).
        #[arg(long)]
        role: Role,
        /// The participant's id: letters, digits, '.', '-', '_'.
        #[arg(long)]
        id: String,
        /// A DNS name or IP address the certificate covers (for connectors
        /// and brokers; default localhost, 127.0.0.1, ::1); repeatable.
        #[arg(long = "name")]
        names: Vec<String>,
        /// How long the certificate is valid, e.g. "90days", "12h".
        #[arg(long, default_value = "90days", value_parser = humantime::parse_duration)]
        validity: Duration,
        /// Key algorithm (default: the PKI's).
        #[arg(long, value_enum)]
        key_algorithm: Option<Algorithm>,
        /// Replace an existing certificate and key of this participant; the
        /// replaced certificate is revoked.
        #[arg(long)]
        force: bool,
        /// Issue the authority's encryption certificate (key agreement, P-256)
        /// instead of its TLS certificate: <dir>/authority/<id>.enc.pem and
        /// .enc.key. Registers encrypt evidence to it.
        #[arg(long)]
        encryption: bool,
    },
    /// Put a certificate on the revocation list (crl.pem), which brokers and
    /// connectors reload.
    Revoke {
        /// The certificate file to revoke.
        #[arg(long, conflicts_with_all = ["serial", "role"])]
        cert: Option<PathBuf>,
        /// The serial to revoke, hex.
        #[arg(long, conflicts_with = "role")]
        serial: Option<String>,
        /// With --id: revoke this participant's current certificate.
        #[arg(long, requires = "id")]
        role: Option<Role>,
        /// With --role.
        #[arg(long, requires = "role")]
        id: Option<String>,
    },
    /// Re-sign the revocation list with a new nextUpdate, before the old one
    /// goes stale (brokers and connectors refuse every peer while it is),
    /// then reload them (SIGHUP). Run it from a timer well within the
    /// validity.
    RefreshCrl {
        /// How long the new list is current.
        #[arg(long, default_value = "30days", value_parser = humantime::parse_duration)]
        valid_for: Duration,
    },
    /// Print a certificate's identity, role, validity, serial and fingerprint.
    Inspect {
        /// The certificate (PEM); or --role and --id to name a participant.
        cert: Option<PathBuf>,
        /// With --id.
        #[arg(long, requires = "id")]
        role: Option<Role>,
        /// With --role.
        #[arg(long, requires = "role")]
        id: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the revoked serials: when each was revoked and whose
    /// certificate in the PKI directory has it.
    Revoked,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Algorithm {
    EcdsaP256,
    Ed25519,
}

impl From<Algorithm> for KeyAlgorithm {
    fn from(a: Algorithm) -> Self {
        match a {
            Algorithm::EcdsaP256 => KeyAlgorithm::EcdsaP256,
            Algorithm::Ed25519 => KeyAlgorithm::Ed25519,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    onceonly_certs::report::exit_code(run(cli))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            trust_domain,
            key_algorithm,
            organisation,
            ca_validity,
            broker_id,
            broker_names,
            validity,
            force,
        } => {
            let mut options = InitOptions::new(&trust_domain);
            options.key_algorithm = key_algorithm.into();
            options.organisation = organisation;
            options.ca_validity = ca_validity;
            options.broker_id = broker_id;
            if !broker_names.is_empty() {
                options.broker_names = broker_names;
            }
            options.broker_validity = validity;
            options.force = force;
            let (pki, broker) = Pki::init(&cli.dir, &options)?;
            println!(
                "created PKI for trust domain {} (organisation {:?})",
                pki.trust_domain(),
                pki.organisation()
            );
            println!("  CA certificate   {}", pki.ca_cert_path().display());
            println!("  revocation list  {}", pki.crl_path().display());
            print_issued(&broker);
        }
        Command::Issue {
            role,
            id,
            names,
            validity,
            key_algorithm,
            force,
            encryption,
        } => {
            let pki = Pki::open(&cli.dir)?;
            let mut options = IssueOptions::new(role, &id);
            options.server_names = names;
            options.validity = validity;
            options.key_algorithm = key_algorithm.map(Into::into);
            options.force = force;
            options.encryption = encryption;
            print_issued(&pki.issue(&options)?);
        }
        Command::Revoke {
            cert,
            serial,
            role,
            id,
        } => {
            let pki = Pki::open(&cli.dir)?;
            // A participant revoked by name takes its encryption
            // certificate with it (an authority's), in the same list.
            let serials = match (role, id, cert, serial) {
                (Some(role), Some(id), _, _) => pki.serials_of_participant(role, &id)?,
                (_, _, Some(path), _) => {
                    let der = pki::load_certs(&path)?.remove(0);
                    vec![CertificateSummary::of(&der)?.serial]
                }
                (_, _, None, Some(serial)) => vec![serial],
                _ => anyhow::bail!(
                    "say what to revoke: --cert FILE, --serial HEX, or --role ROLE --id ID"
                ),
            };
            let asked: Vec<&str> = serials.iter().map(String::as_str).collect();
            let added = pki.revoke_all(&asked)?;
            for serial in &serials {
                // `added` holds serials as the list writes them.
                let listed = pki::normalized_serial(serial).unwrap_or_else(|_| serial.clone());
                if added.contains(&listed) {
                    println!(
                        "revoked serial {serial}; {} updated",
                        pki.crl_path().display()
                    );
                } else {
                    println!("serial {serial} was already revoked");
                }
            }
        }
        Command::Inspect {
            cert,
            role,
            id,
            json,
        } => {
            let path = match (role, id, cert) {
                (Some(role), Some(id), _) => Pki::open(&cli.dir)?.participant_paths(role, &id).0,
                (_, _, Some(cert)) => cert,
                _ => anyhow::bail!("name a certificate file, or --role ROLE --id ID"),
            };
            let der = pki::load_certs(&path)?.remove(0);
            let summary = CertificateSummary::of(&der)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!("{summary}");
            }
        }
        Command::RefreshCrl { valid_for } => {
            let pki = Pki::open(&cli.dir)?;
            let valid_for = time::Duration::try_from(valid_for)
                .map_err(|e| anyhow::anyhow!("--valid-for: {e}"))?;
            let next_update = OffsetDateTime::now_utc() + valid_for;
            pki.refresh_crl(next_update)?;
            println!(
                "{} re-signed, current until {}; reload brokers and connectors (SIGHUP)",
                pki.crl_path().display(),
                rfc3339(next_update)
            );
        }
        Command::Revoked => {
            let pki = Pki::open(&cli.dir)?;
            let crl = pki::read_revocation_list(&pki.crl_path()).context("reading the CRL")?;
            let stored = pki.stored_certificates()?;
            let current = match crl.next_update {
                Some(until) if until < OffsetDateTime::now_utc() => {
                    format!("STALE since {} (run refresh-crl)", rfc3339(until))
                }
                Some(until) => format!("current until {}", rfc3339(until)),
                None => "no nextUpdate".to_owned(),
            };
            println!(
                "CRL number {}, signed {}, {current}; {} revoked",
                crl.number,
                rfc3339(crl.this_update),
                crl.revoked.len()
            );
            for (serial, when) in &crl.revoked {
                let holder = stored.iter().find(|c| c.serial_hex == *serial).map_or(
                    "(not in this PKI directory)".to_owned(),
                    |c| {
                        let p = &c.participant;
                        let kind = if c.encryption { " (encryption)" } else { "" };
                        format!("{}/{}{kind}  {p}", p.role(), p.id())
                    },
                );
                println!("{serial}  revoked {}  {holder}", rfc3339(*when));
            }
        }
    }
    Ok(())
}

/// A time as RFC 3339 in UTC to the second, e.g. `2026-11-23T09:30:00Z`.
fn rfc3339(when: OffsetDateTime) -> String {
    let utc = when.to_offset(time::UtcOffset::UTC);
    utc.replace_nanosecond(0)
        .unwrap_or(utc)
        .format(&Rfc3339)
        .unwrap_or_else(|_| when.to_string())
}

fn print_issued(issued: &pki::IssuedCertificate) {
    let participant: &Participant = &issued.participant;
    println!("issued {participant}");
    println!("  certificate  {}", issued.cert_path.display());
    println!("  key          {} (mode 0600)", issued.key_path.display());
    println!("  serial       {}", issued.serial_hex);
    println!("  valid until  {}", rfc3339(issued.not_after));
    if let Some(old) = &issued.revoked_serial {
        println!("  replaced     {old}, now revoked (reload brokers and connectors: SIGHUP)");
    }
}
