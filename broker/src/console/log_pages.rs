//! The log pages. For auditors and data-protection officers (`auditor`):
//! records filtered by caller, evidence type, outcome, time and subject
//! (by pseudonym, or by identifier, which is itself recorded as a read of
//! that person's history); one record, with its inclusion proof checked
//! here against the signed tree head and the log's public key; the
//! consistency of two saved heads; one citizen's history, in the words a
//! portal's transparency view would use. A look-up by identifier is a
//! POST with the CSRF check, recorded before anything is shown.

use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use maud::html;
use onceonly_certs::Role;
use onceonly_proto::v1::{
    AuditRecord, ExchangeOutcome, PreviewStep, RecordKind, SubjectId, SubjectIdScheme,
};
use serde::Deserialize;

use super::page::{Lang, failed, header_row, layout, refused, when};
use super::{Console, Viewer};
use crate::access_log::Access;
use crate::audit::AuditFilter;

/// Records per page.
const PER_PAGE: usize = 50;

/// What the records page is filtered by (empty fields: no filter).
#[derive(Debug, Default, Deserialize)]
pub struct RecordsQuery {
    #[serde(default)]
    caller: String,
    #[serde(default)]
    evidence_type: String,
    #[serde(default)]
    outcome: String,
    /// First day, YYYY-MM-DD (UTC).
    #[serde(default)]
    from: String,
    /// Last day, YYYY-MM-DD (UTC), included.
    #[serde(default)]
    to: String,
    /// A subject's pseudonym, hex (as the log shows it).
    #[serde(default)]
    pseudonym: String,
    /// Where the page starts (a log index).
    #[serde(default)]
    start: u64,
}

fn given(field: &str) -> Option<String> {
    Some(field.trim().to_owned()).filter(|f| !f.is_empty())
}

fn day_start(day: &str) -> Result<i64, String> {
    let format = time::format_description::parse_borrowed::<2>("[year]-[month]-[day]")
        .map_err(|e| e.to_string())?;
    time::Date::parse(day, &format)
        .map(|date| date.midnight().assume_utc().unix_timestamp())
        .map_err(|_| format!("{day:?} is not a date of the form 2026-12-31"))
}

fn outcomes() -> impl Iterator<Item = ExchangeOutcome> {
    (1..=5).filter_map(|n| ExchangeOutcome::try_from(n).ok())
}

fn schemes() -> impl Iterator<Item = SubjectIdScheme> {
    (1..=3).filter_map(|n| SubjectIdScheme::try_from(n).ok())
}

fn outcome_words(lang: Lang, outcome: ExchangeOutcome) -> &'static str {
    match outcome {
        ExchangeOutcome::Delivered => lang.pick("delivered", "übermittelt"),
        ExchangeOutcome::Rejected => {
            lang.pick("rejected (malformed)", "zurückgewiesen (fehlerhaft)")
        }
        ExchangeOutcome::Denied => lang.pick("denied", "verweigert"),
        ExchangeOutcome::Failed => lang.pick("failed", "fehlgeschlagen"),
        ExchangeOutcome::Cancelled => lang.pick("cancelled", "abgebrochen"),
        ExchangeOutcome::Unspecified => "",
    }
}

fn kind_words(lang: Lang, record: &AuditRecord) -> String {
    match record.kind() {
        RecordKind::Unspecified => outcome_words(lang, record.outcome()).to_owned(),
        RecordKind::ConsentGranted => lang.pick("consent granted", "Einwilligung erteilt").into(),
        RecordKind::ConsentRevoked => lang
            .pick("consent revoked", "Einwilligung widerrufen")
            .into(),
        RecordKind::ConsentsListed => lang
            .pick("consents listed", "Einwilligungen abgefragt")
            .into(),
        RecordKind::HistoryRead => lang.pick("history read", "Verlauf eingesehen").into(),
        RecordKind::KeyHandover => lang
            .pick("log key handed over", "Protokollschlüssel übergeben")
            .into(),
        RecordKind::PolicyApplied => lang.pick("policy applied", "Regelwerk angewendet").into(),
        RecordKind::PreviewStep => {
            let step = match record.preview_step() {
                PreviewStep::Offered => {
                    lang.pick("held for preview", "zur Vorschau bereitgehalten")
                }
                PreviewStep::Shown => lang.pick("shown to the person", "der Person gezeigt"),
                PreviewStep::Accepted => {
                    lang.pick("accepted by the person", "von der Person angenommen")
                }
                PreviewStep::Declined => {
                    lang.pick("declined by the person", "von der Person abgelehnt")
                }
                PreviewStep::Expired => lang.pick("preview expired", "Vorschau abgelaufen"),
                PreviewStep::Forwarded => lang.pick("passed on", "weitergegeben"),
                PreviewStep::Unspecified => "",
            };
            format!("{}: {step}", lang.pick("preview", "Vorschau"))
        }
    }
}

fn subject_of(scheme: &str, value: &str) -> Result<SubjectId, String> {
    let scheme = SubjectIdScheme::from_str_name(scheme)
        .filter(|s| *s != SubjectIdScheme::Unspecified)
        .ok_or_else(|| format!("{scheme:?} is not an identifier scheme"))?;
    let subject = SubjectId {
        scheme: scheme as i32,
        value: value.trim().to_owned(),
    };
    onceonly_proto::validate::subject(Some(&subject), "subject").map_err(|v| v.description)?;
    Ok(subject)
}

/// A look-up by identifier: a POST, so that no other site can make a
/// person's browser look someone up in their name (a link or an image
/// would be a GET), and so that the identifier is in no URL or browser
/// history.
#[derive(Debug, Deserialize)]
pub struct LookupForm {
    csrf: String,
    scheme: String,
    subject: String,
}

/// Checks a look-up form (an auditor's, from a console page), records the
/// read of the person's history, and returns their pseudonym; or the page
/// that says why not.
async fn look_up(
    viewer: &Viewer,
    console: &Console,
    headers: &HeaderMap,
    uri: &Uri,
    form: &LookupForm,
) -> Result<Vec<u8>, Response> {
    viewer
        .permit_change(&[Role::Auditor], console, headers, uri, &form.csrf)
        .map_err(|refusal| *refusal)?;
    let subject = subject_of(&form.scheme, &form.subject)
        .map_err(|message| refused(viewer.lang, StatusCode::BAD_REQUEST, &message, None))?;
    // Recorded before anything is shown.
    console
        .broker
        .record_access(
            RecordKind::HistoryRead,
            &viewer.who,
            &subject,
            Access::default(),
        )
        .await
        .map_err(|refusal| failed(viewer, &refusal))?;
    Ok(console
        .broker
        .pseudonyms
        .pseudonym(subject.scheme, &subject.value))
}

/// `POST /records/lookup`: the records of the person an identifier names.
pub async fn records_of(
    viewer: Viewer,
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    uri: Uri,
    Form(form): Form<LookupForm>,
) -> Response {
    match look_up(&viewer, &console, &headers, &uri, &form).await {
        Ok(pseudonym) => {
            let query = RecordsQuery {
                pseudonym: hex::encode(pseudonym),
                ..RecordsQuery::default()
            };
            list(viewer, &console, query).await
        }
        Err(page) => page,
    }
}

/// `GET /records`: the log, filtered.
pub async fn records(
    viewer: Viewer,
    State(console): State<Arc<Console>>,
    Query(query): Query<RecordsQuery>,
) -> Response {
    if let Err(refusal) = viewer.require(&[Role::Auditor]) {
        return *refusal;
    }
    list(viewer, &console, query).await
}

async fn list(viewer: Viewer, console: &Console, query: RecordsQuery) -> Response {
    let lang = viewer.lang;
    let broker = &console.broker;
    let bad = |message: String| refused(lang, StatusCode::BAD_REQUEST, &message, None);
    let mut filter = AuditFilter {
        caller_id: given(&query.caller),
        evidence_type: given(&query.evidence_type),
        outcome: given(&query.outcome).and_then(|o| ExchangeOutcome::from_str_name(&o)),
        ..AuditFilter::default()
    };
    if let Some(from) = given(&query.from) {
        match day_start(&from) {
            Ok(at) => filter.received_after = Some(at),
            Err(message) => return bad(message),
        }
    }
    if let Some(to) = given(&query.to) {
        match day_start(&to) {
            Ok(at) => filter.received_before = Some(at + 86_400),
            Err(message) => return bad(message),
        }
    }
    if let Some(pseudonym) = given(&query.pseudonym) {
        match hex::decode(&pseudonym) {
            Ok(bytes) => filter.subject_pseudonym = Some(bytes),
            Err(_) => return bad(format!("{pseudonym:?} is not a pseudonym (hex)")),
        }
    }
    let (found, next) = match broker.audit.query(filter, query.start, PER_PAGE).await {
        Ok(found) => found,
        Err(error) => return failed(&viewer, &error),
    };
    let next_link = next.map(|next| {
        let mut link = format!("/records?start={next}");
        for (name, value) in [
            ("caller", &query.caller),
            ("evidence_type", &query.evidence_type),
            ("outcome", &query.outcome),
            ("from", &query.from),
            ("to", &query.to),
            ("pseudonym", &query.pseudonym),
        ] {
            if !value.is_empty() {
                link.push_str(&format!("&{name}={}", url_escape(value)));
            }
        }
        lang.link(&link)
    });
    layout(
        lang,
        Some(&viewer),
        lang.pick("Audit log", "Protokoll"),
        html! {
            form method="get" action="/records" {
                input type="hidden" name="lang" value=(lang.code());
                fieldset {
                    legend { (lang.pick("Filter", "Filter")) }
                    label for="caller" { (lang.pick("Caller (SPIFFE id)", "Aufrufer (SPIFFE-ID)")) }
                    input id="caller" name="caller" type="text" size="60" value=(query.caller);
                    label for="evidence_type" { (lang.pick("Evidence type", "Nachweistyp")) }
                    input id="evidence_type" name="evidence_type" type="text" value=(query.evidence_type);
                    label for="outcome" { (lang.pick("Outcome", "Ergebnis")) }
                    select id="outcome" name="outcome" {
                        option value="" { (lang.pick("any", "alle")) }
                        @for outcome in outcomes() {
                            option value=(outcome.as_str_name()) selected[query.outcome == outcome.as_str_name()] {
                                (outcome_words(lang, outcome))
                            }
                        }
                    }
                    label for="from" { (lang.pick("From (day, UTC)", "Von (Tag, UTC)")) }
                    input id="from" name="from" type="date" value=(query.from);
                    label for="to" { (lang.pick("To (day, UTC)", "Bis (Tag, UTC)")) }
                    input id="to" name="to" type="date" value=(query.to);
                    label for="pseudonym" { (lang.pick("Subject pseudonym (hex)", "Pseudonym der Person (hex)")) }
                    input id="pseudonym" name="pseudonym" type="text" size="70" value=(query.pseudonym);
                    div { button type="submit" { (lang.pick("Show records", "Einträge anzeigen")) } }
                }
            }
            (lookup_form(&viewer, "/records/lookup", lang.pick("Or look a person up by identifier (this is recorded)", "Oder eine Person per Kennung nachschlagen (wird protokolliert)")))
            p id="found" { (found.len()) " " (lang.pick("records on this page.", "Einträge auf dieser Seite.")) }
            @if !found.is_empty() {
                table {
                    caption { (lang.pick("Records, oldest first", "Einträge, älteste zuerst")) }
                    (header_row(lang, &[("Index", "Index"), ("Received", "Eingegangen"), ("Caller", "Aufrufer"), ("Evidence type", "Nachweistyp"), ("What", "Was"), ("Subject (pseudonym)", "Person (Pseudonym)")]))
                    tbody {
                        @for record in &found {
                            tr {
                                td { a href=(lang.link(&format!("/records/{}", record.log_index))) { (record.log_index) } }
                                td { (when(record.received_at.as_ref().map_or(0, |t| t.seconds))) }
                                td { (record.caller_id) }
                                td { (record.evidence_type) }
                                td { (kind_words(lang, record)) }
                                td { code { (hex::encode(record.subject_pseudonym.get(..8).unwrap_or_default())) } }
                            }
                        }
                    }
                }
            }
            @if let Some(next) = next_link {
                p { a href=(next) { (lang.pick("Next page", "Nächste Seite")) } }
            }
        },
    )
    .into_response()
}

/// The form that looks a person up by identifier, posting to `action`.
fn lookup_form(viewer: &Viewer, action: &str, legend: &str) -> maud::Markup {
    let lang = viewer.lang;
    html! {
        form method="post" action=(lang.link(action)) {
            input type="hidden" name="csrf" value=(viewer.csrf);
            fieldset {
                legend { (legend) }
                label for="scheme" { (lang.pick("Identifier scheme", "Art der Kennung")) }
                select id="scheme" name="scheme" {
                    @for scheme in schemes() {
                        option value=(scheme.as_str_name()) { (scheme.as_str_name()) }
                    }
                }
                label for="subject" { (lang.pick("Identifier", "Kennung")) }
                input id="subject" name="subject" type="text" autocomplete="off";
                div { button type="submit" { (lang.pick("Look up", "Nachschlagen")) } }
            }
        }
    }
}

fn url_escape(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What checking a record's place in the log found.
enum ProofCheck {
    /// Verified against this head.
    Verified { tree_size: u64, root: String },
    /// Not in a signed head yet.
    NotYetCovered { tree_size: u64 },
    /// The proof or the head did not check.
    Failed(String),
}

async fn check_inclusion(console: &Console, index: u64, leaf_data: &[u8]) -> ProofCheck {
    let audit = &console.broker.audit;
    let head = match audit.signed_tree_head().await {
        Ok(Some(head)) => head,
        Ok(None) => return ProofCheck::NotYetCovered { tree_size: 0 },
        Err(error) => return ProofCheck::Failed(error.to_string()),
    };
    if let Err(error) = head.verify(&console.log_public_key) {
        return ProofCheck::Failed(format!(
            "the signed tree head does not verify under the log's public key: {error}"
        ));
    }
    if index >= head.tree_size {
        return ProofCheck::NotYetCovered {
            tree_size: head.tree_size,
        };
    }
    let path = match audit.inclusion_proof(index, head.tree_size).await {
        Ok((path, _)) => path,
        Err(error) => return ProofCheck::Failed(error.to_string()),
    };
    let leaf = onceonly_merkle::leaf_hash(leaf_data);
    match onceonly_merkle::verify_inclusion(&leaf, index, head.tree_size, &path, &head.root_hash) {
        Ok(()) => ProofCheck::Verified {
            tree_size: head.tree_size,
            root: hex::encode(head.root_hash),
        },
        Err(error) => ProofCheck::Failed(error.to_string()),
    }
}

/// `GET /records/{index}`: one record, and its inclusion proof checked.
pub async fn record(
    viewer: Viewer,
    State(console): State<Arc<Console>>,
    Path(index): Path<u64>,
) -> Response {
    if let Err(refusal) = viewer.require(&[Role::Auditor]) {
        return *refusal;
    }
    let lang = viewer.lang;
    let entry = match console.broker.audit.entries(index, 1).await {
        Ok(entries) => entries.into_iter().find(|(at, _, _)| *at == index),
        Err(error) => return failed(&viewer, &error),
    };
    let Some((_, record, leaf_data)) = entry else {
        return refused(
            lang,
            StatusCode::NOT_FOUND,
            &format!(
                "{} {index}.",
                lang.pick("The log has no record", "Das Protokoll hat keinen Eintrag")
            ),
            None,
        );
    };
    let check = check_inclusion(&console, index, &leaf_data).await;
    let record = &record;
    let title = format!("{} {index}", lang.pick("Record", "Eintrag"));
    layout(
        lang,
        Some(&viewer),
        &title,
        html! {
            @match &check {
                ProofCheck::Verified { tree_size, root } => {
                    p class="ok" role="status" id="proof" {
                        "✓ " (lang.pick("Inclusion proof verified: this record is entry", "Inklusionsbeweis geprüft: dieser Eintrag ist Eintrag"))
                        " " (index) " " (lang.pick("of the signed tree head of size", "des signierten Baumkopfs der Größe")) " "
                        (tree_size) " " (lang.pick("with root", "mit Wurzel")) " " code { (root) }
                        (lang.pick(", whose signature verifies under the log's public key.", ", dessen Signatur mit dem öffentlichen Schlüssel des Protokolls geprüft ist."))
                    }
                }
                ProofCheck::NotYetCovered { tree_size } => {
                    p class="warn" role="status" id="proof" {
                        (lang.pick("Not yet covered by a signed tree head (its size is", "Noch von keinem signierten Baumkopf erfasst (seine Größe ist"))
                        " " (tree_size) "). " (lang.pick("Reload in a moment.", "Laden Sie gleich neu."))
                    }
                }
                ProofCheck::Failed(why) => {
                    p class="bad" role="alert" id="proof" {
                        "✗ " (lang.pick("The inclusion proof does NOT verify:", "Der Inklusionsbeweis ist NICHT gültig:")) " " (why)
                    }
                }
            }
            dl {
                dt { (lang.pick("What", "Was")) } dd { (kind_words(lang, record)) }
                dt { (lang.pick("Received", "Eingegangen")) } dd { (when(record.received_at.as_ref().map_or(0, |t| t.seconds))) }
                dt { (lang.pick("Caller", "Aufrufer")) } dd { (record.caller_id) }
                dt { (lang.pick("Exchange id", "Vorgangs-ID")) } dd { code { (record.exchange_id) } }
                dt { (lang.pick("Request id", "Anfrage-ID")) } dd { code { (record.request_id) } }
                dt { (lang.pick("Evidence type", "Nachweistyp")) } dd { (record.evidence_type) }
                dt { (lang.pick("Purpose", "Zweck")) } dd { (record.purpose) }
                dt { (lang.pick("Legal basis", "Rechtsgrundlage")) } dd { (record.legal_basis) }
                dt { (lang.pick("Subject (pseudonym)", "Person (Pseudonym)")) } dd { code { (hex::encode(&record.subject_pseudonym)) } }
                dt { (lang.pick("Register", "Register")) } dd { (record.connector_id) }
                dt { (lang.pick("Decided by rule", "Entschieden durch Regel")) } dd { (record.policy_rule) }
                dt { (lang.pick("Policy version", "Version des Regelwerks")) } dd { (record.policy_version) " " code { (hex::encode(&record.policy_sha256)) } }
                dt { (lang.pick("Status", "Status")) } dd { (record.status_code) " " (record.status_message) }
                @if !record.policy_applied_by.is_empty() {
                    dt { (lang.pick("Applied by", "Angewendet von")) } dd { (record.policy_applied_by) }
                    dt { (lang.pick("Changes", "Änderungen")) } dd { ul { @for change in &record.policy_changes { li { (change) } } } }
                }
            }
        },
    )
    .into_response()
}

/// What the consistency page is asked.
#[derive(Debug, Default, Deserialize)]
pub struct ConsistencyQuery {
    #[serde(default)]
    first_size: Option<u64>,
    #[serde(default)]
    first_root: String,
    #[serde(default)]
    second_size: Option<u64>,
    #[serde(default)]
    second_root: String,
}

fn root_of(hex_root: &str) -> Option<onceonly_merkle::Hash> {
    hex::decode(hex_root.trim()).ok()?.try_into().ok()
}

/// `GET /consistency`: the current head (to save), and whether two saved
/// heads are of one log that only grew.
pub async fn consistency(
    viewer: Viewer,
    State(console): State<Arc<Console>>,
    Query(query): Query<ConsistencyQuery>,
) -> Response {
    if let Err(refusal) = viewer.require(&[Role::Auditor]) {
        return *refusal;
    }
    let lang = viewer.lang;
    let audit = &console.broker.audit;
    let head = match audit.signed_tree_head().await {
        Ok(head) => head,
        Err(error) => return failed(&viewer, &error),
    };
    let (current_size, current_root) = head
        .as_ref()
        .map(|h| (h.tree_size, hex::encode(h.root_hash)))
        .unwrap_or_default();
    // The second head is the current one unless another is given.
    let (second_size, second_root) = match query.second_size {
        Some(size) => (Some(size), query.second_root.clone()),
        None => (Some(current_size), current_root.clone()),
    };
    let verdict: Option<Result<(), String>> = match (query.first_size, second_size) {
        (Some(first), Some(second)) => {
            Some(match (root_of(&query.first_root), root_of(&second_root)) {
                (Some(first_root), Some(second_root)) if first <= second => {
                    match audit.consistency_proof(first, second).await {
                        Ok(proof) => onceonly_merkle::verify_consistency(
                            first,
                            second,
                            &first_root,
                            &second_root,
                            &proof,
                        )
                        .map_err(|e| e.to_string()),
                        Err(error) => Err(error.to_string()),
                    }
                }
                (Some(_), Some(_)) => Err(lang
                    .pick(
                        "the first head must not be larger than the second",
                        "der erste Kopf darf nicht größer als der zweite sein",
                    )
                    .to_owned()),
                _ => Err(lang
                    .pick(
                        "a root is not 32 bytes of hex",
                        "eine Wurzel ist nicht 32 Byte hex",
                    )
                    .to_owned()),
            })
        }
        _ => None,
    };
    layout(
        lang,
        Some(&viewer),
        lang.pick("Consistency of two heads", "Konsistenz zweier Baumköpfe"),
        html! {
            @match &verdict {
                Some(Ok(())) => p class="ok" role="status" id="verdict" {
                    "✓ " (lang.pick("Consistent: the second head's log is the first's, only grown.", "Konsistent: das Protokoll des zweiten Kopfs ist das des ersten, nur gewachsen."))
                },
                Some(Err(why)) => p class="bad" role="alert" id="verdict" {
                    "✗ " (lang.pick("NOT consistent:", "NICHT konsistent:")) " " (why)
                },
                None => {},
            }
            h2 { (lang.pick("The head now (save it)", "Der Kopf jetzt (zum Speichern)")) }
            dl {
                dt { (lang.pick("Tree size", "Baumgröße")) } dd id="current-size" { (current_size) }
                dt { (lang.pick("Root", "Wurzel")) } dd { code id="current-root" { (current_root) } }
            }
            form method="get" action="/consistency" {
                input type="hidden" name="lang" value=(lang.code());
                fieldset {
                    legend { (lang.pick("Two saved heads", "Zwei gespeicherte Köpfe")) }
                    label for="first_size" { (lang.pick("First head: tree size", "Erster Kopf: Baumgröße")) }
                    input id="first_size" name="first_size" type="number" min="0" value=[query.first_size];
                    label for="first_root" { (lang.pick("First head: root (hex)", "Erster Kopf: Wurzel (hex)")) }
                    input id="first_root" name="first_root" type="text" size="70" value=(query.first_root);
                    label for="second_size" { (lang.pick("Second head: tree size", "Zweiter Kopf: Baumgröße")) }
                    input id="second_size" name="second_size" type="number" min="0" value=(query.second_size.unwrap_or(current_size));
                    label for="second_root" { (lang.pick("Second head: root (hex)", "Zweiter Kopf: Wurzel (hex)")) }
                    input id="second_root" name="second_root" type="text" size="70" value=(if query.second_root.is_empty() { current_root.clone() } else { query.second_root.clone() });
                    div { button type="submit" { (lang.pick("Check consistency", "Konsistenz prüfen")) } }
                }
            }
        },
    )
    .into_response()
}

/// The most records of one person the history page reads.
const MOST_HISTORY: usize = 10_000;

/// `GET /history`: the form that looks a person up.
pub async fn history_form(viewer: Viewer) -> Response {
    if let Err(refusal) = viewer.require(&[Role::Auditor]) {
        return *refusal;
    }
    let lang = viewer.lang;
    layout(
        lang,
        Some(&viewer),
        lang.pick("A citizen's history", "Verlauf einer Person"),
        lookup_form(
            &viewer,
            "/history",
            lang.pick(
                "Whose history (this is recorded)",
                "Wessen Verlauf (wird protokolliert)",
            ),
        ),
    )
    .into_response()
}

/// `POST /history`: one person's history as their portal shows it: who
/// asked for what about them, why, under which law, and what came of it,
/// newest first. Each look is recorded as a read of their history.
pub async fn history(
    viewer: Viewer,
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    uri: Uri,
    Form(form): Form<LookupForm>,
) -> Response {
    let lang = viewer.lang;
    let pseudonym = match look_up(&viewer, &console, &headers, &uri, &form).await {
        Ok(pseudonym) => pseudonym,
        Err(page) => return page,
    };
    let filter = AuditFilter {
        subject_pseudonym: Some(pseudonym),
        ..AuditFilter::default()
    };
    // Every page of their records (looks and consents are records of
    // theirs too, and must not push exchanges off the first page).
    let (mut records, more) = match console
        .broker
        .records_matching(filter, MOST_HISTORY, |r| {
            r.kind() == RecordKind::Unspecified
        })
        .await
    {
        Ok(found) => found,
        Err(error) => return failed(&viewer, &error),
    };
    records.reverse();
    layout(
        lang,
        Some(&viewer),
        lang.pick("A citizen's history", "Verlauf einer Person"),
        html! {
            @if records.is_empty() {
                p id="history-summary" { (lang.pick("No authority has asked for evidence about this person.", "Keine Behörde hat Nachweise zu dieser Person angefordert.")) }
            } @else {
                p id="history-summary" { (records.len()) " " (lang.pick("requests for evidence about this person:", "Anfragen nach Nachweisen zu dieser Person:")) }
                @if more {
                    p class="warn" { (lang.pick("Only the oldest requests are shown; export the log for all.", "Nur die ältesten Anfragen werden gezeigt; exportieren Sie das Protokoll für alle.")) }
                }
                table {
                    caption { (lang.pick("Who asked for what, and why, newest first", "Wer hat was angefordert, und warum, neueste zuerst")) }
                    (header_row(lang, &[("When", "Wann"), ("Authority", "Behörde"), ("Evidence", "Nachweis"), ("Purpose", "Zweck"), ("Legal basis", "Rechtsgrundlage"), ("Result", "Ergebnis")]))
                    tbody {
                        @for record in &records {
                            tr {
                                td { (when(record.received_at.as_ref().map_or(0, |t| t.seconds))) }
                                td { (record.caller_id.rsplit('/').next().unwrap_or_default()) }
                                td { (record.evidence_type) }
                                td { (record.purpose) }
                                td { (record.legal_basis) }
                                td { (citizen_words(lang, record)) }
                            }
                        }
                    }
                }
            }
            p { a href=(lang.link("/history")) { (lang.pick("Look up another person", "Eine andere Person nachschlagen")) } }
        },
    )
    .into_response()
}

fn citizen_words(lang: Lang, record: &AuditRecord) -> &'static str {
    match record.outcome() {
        ExchangeOutcome::Delivered => {
            lang.pick("sent to the authority", "an die Behörde übermittelt")
        }
        ExchangeOutcome::Denied => lang.pick("refused: not allowed", "abgelehnt: nicht erlaubt"),
        _ => lang.pick("not sent", "nicht übermittelt"),
    }
}
