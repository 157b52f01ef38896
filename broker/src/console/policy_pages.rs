//! The policy pages, for policy staff (`policy-admin`): edit the policy in
//! force, review the edit (the broker's own check, the lint findings, the
//! changes in words, and the logged decisions it would have decided
//! otherwise), and apply it after confirming. Applying puts the text in
//! force as a reload does, and the broker writes its log entry naming the
//! person, the version and the changes.

use std::sync::Arc;

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use onceonly_certs::Role;
use onceonly_proto::v1::AuditRecord;
use serde::Deserialize;

use super::page::{failed, header_row, layout, refused, when};
use super::{Console, Viewer};
use crate::policy::{ApplyError, Policy};
use crate::policy_review::dry_run::{self, Window};
use crate::policy_review::lint;

/// How long an apply waits for its log entry before saying it is late.
const ENTRY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// How many days of decisions a review replays unless asked otherwise.
const DEFAULT_DAYS: u32 = 30;

/// A rule letting more authorities than this ask is reported as broad.
const BROAD: usize = 10;

/// The most records one review replays; past that, the page says the dry
/// run stopped short (and `onceonly-policy dry-run` does the whole log).
const MOST_REPLAYED: usize = 200_000;

/// `GET /policy`: the policy in force, in an editor.
pub async fn edit(viewer: Viewer, State(console): State<Arc<Console>>) -> Response {
    if let Err(refusal) = viewer.require(&[Role::PolicyAdmin]) {
        return *refusal;
    }
    let current = console.broker.policy.current();
    let lang = viewer.lang;
    layout(
        lang,
        Some(&viewer),
        lang.pick("Policy", "Regelwerk"),
        html! {
            (in_force(&viewer, &current))
            (editor(&viewer, current.text(), DEFAULT_DAYS))
        },
    )
    .into_response()
}

fn in_force(viewer: &Viewer, policy: &Policy) -> Markup {
    let lang = viewer.lang;
    html! {
        dl {
            dt { (lang.pick("Version in force", "Geltende Version")) }
            dd { (policy.version()) }
            dt { (lang.pick("Digest (SHA-256)", "Prüfsumme (SHA-256)")) }
            dd { code { (hex::encode(policy.sha256())) } }
            dt { (lang.pick("Rules", "Regeln")) }
            dd { (policy.len()) }
        }
    }
}

fn editor(viewer: &Viewer, text: &str, days: u32) -> Markup {
    let lang = viewer.lang;
    html! {
        form method="post" action=(lang.link("/policy/review")) {
            input type="hidden" name="csrf" value=(viewer.csrf);
            label for="text" { (lang.pick("Policy text (TOML)", "Text des Regelwerks (TOML)")) }
            // The newline first: HTML drops one leading newline of a
            // textarea, so a text that starts with one keeps it.
            textarea id="text" name="text" rows="24" spellcheck="false" { "\n" (text) }
            label for="days" { (lang.pick(
                "Replay the decisions of the last days",
                "Entscheidungen der letzten Tage erneut prüfen"
            )) }
            input id="days" name="days" type="number" min="1" max="3650" value=(days);
            div { button type="submit" { (lang.pick("Review the change", "Änderung prüfen")) } }
        }
    }
}

/// What a review form sends.
#[derive(Debug, Deserialize)]
pub struct ReviewForm {
    csrf: String,
    text: String,
    days: Option<u32>,
}

/// `POST /policy/review`: the edit checked, linted, compared and replayed.
pub async fn review(
    viewer: Viewer,
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    uri: Uri,
    Form(form): Form<ReviewForm>,
) -> Response {
    if let Err(refusal) =
        viewer.permit_change(&[Role::PolicyAdmin], &console, &headers, &uri, &form.csrf)
    {
        return *refusal;
    }
    let lang = viewer.lang;
    let form = ReviewForm {
        text: unix_lines(&form.text),
        ..form
    };
    let days = form.days.unwrap_or(DEFAULT_DAYS).clamp(1, 3650);
    let broker = &console.broker;
    let current = broker.policy.current();
    // Errors name the file as edited here, with the line and the fix.
    let edited_path =
        std::path::PathBuf::from(format!("{} (as edited)", broker.policy.path().display()));
    let edited = match Policy::parse(&edited_path, &form.text, &broker.routing) {
        Ok(policy) => policy,
        Err(error) => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                layout(
                    lang,
                    Some(&viewer),
                    lang.pick("The policy does not check", "Das Regelwerk ist fehlerhaft"),
                    html! {
                        p class="bad" role="alert" {
                            strong { (lang.pick("Not applicable:", "Nicht anwendbar:")) }
                            " " (error.to_string())
                        }
                        (editor(&viewer, &form.text, days))
                    },
                ),
            )
                .into_response();
        }
    };
    let since = time::OffsetDateTime::now_utc().unix_timestamp() - i64::from(days) * 86_400;
    let (records, truncated) = match logged_since(&console, since).await {
        Ok(records) => records,
        Err(error) => return failed(&viewer, &error),
    };
    let unchanged = edited.sha256() == current.sha256();
    // Linting and replaying are CPU work: off the runtime that serves
    // exchanges.
    let previous = current.clone();
    let worked = tokio::task::spawn_blocking(move || {
        let findings = lint::check(
            &edited,
            &lint::Options {
                known_authorities: None,
                broad: BROAD,
            },
        );
        let changes = crate::policy_diff::diff(&previous, &edited);
        let report = dry_run::replay(
            records,
            &edited,
            &Window {
                since: Some(since),
                ..Window::default()
            },
        );
        (findings, changes, report)
    })
    .await;
    let (findings, changes, report) = match worked {
        Ok(worked) => worked,
        Err(error) => return failed(&viewer, &error),
    };
    layout(
        lang,
        Some(&viewer),
        lang.pick("Review the change", "Änderung prüfen"),
        html! {
            section aria-labelledby="checks" {
                h2 id="checks" { (lang.pick("Findings", "Hinweise")) }
                @if findings.is_empty() {
                    p class="ok" { (lang.pick("✓ The broker accepts this policy, and the lint found nothing.", "✓ Der Broker akzeptiert dieses Regelwerk; die Prüfung fand nichts.")) }
                } @else {
                    p class="warn" { (lang.pick("The broker accepts this policy; the lint found:", "Der Broker akzeptiert dieses Regelwerk; die Prüfung fand:")) }
                    ul {
                        @for finding in &findings {
                            li { (lang.pick("line", "Zeile")) " " (finding.line) ": " (finding.message) }
                        }
                    }
                }
            }
            section aria-labelledby="changes" {
                h2 id="changes" { (lang.pick("What changes", "Was sich ändert")) }
                @if changes.is_empty() {
                    p { (lang.pick("No rule changes.", "Keine Regeländerungen.")) }
                } @else {
                    ul { @for change in &changes { li { (change) } } }
                }
            }
            section aria-labelledby="dry-run" {
                h2 id="dry-run" { (lang.pick("Logged decisions that would change", "Protokollierte Entscheidungen, die sich ändern würden")) }
                p id="dry-run-summary" {
                    (report.changed.len()) " "
                    (lang.pick("of", "von")) " " (report.replayed) " "
                    (lang.pick("decisions of the last", "Entscheidungen der letzten")) " " (days) " "
                    (lang.pick("days would change.", "Tage würden sich ändern."))
                    @if truncated {
                        " " (lang.pick("The dry run stopped after", "Die Probe endete nach")) " " (MOST_REPLAYED) " "
                        (lang.pick("records; run onceonly-policy dry-run for the whole log.", "Einträgen; onceonly-policy dry-run prüft das ganze Protokoll."))
                    }
                    @if report.undetermined > 0 {
                        " " (report.undetermined) " "
                        (lang.pick("cannot be told: the edited policy asks for a consent the log does not show.", "lassen sich nicht bestimmen: das geänderte Regelwerk verlangt eine Einwilligung, die das Protokoll nicht zeigt."))
                    }
                }
                @if !report.changed.is_empty() {
                    table {
                        caption { (lang.pick("By rule", "Nach Regel")) }
                        (header_row(lang, &[("Rule", "Regel"), ("Change", "Änderung"), ("Decisions", "Entscheidungen")]))
                        tbody {
                            @for ((rule, direction), count) in report.by_rule() {
                                tr { td { code { (rule) } } td { (direction) } td { (count) } }
                            }
                        }
                    }
                    table {
                        caption { (lang.pick("Each decision (subjects as pseudonyms)", "Jede Entscheidung (Personen als Pseudonyme)")) }
                        (header_row(lang, &[("#", "#"), ("Received", "Eingegangen"), ("Authority", "Behörde"), ("Evidence type", "Nachweistyp"), ("Purpose", "Zweck"), ("Subject", "Person"), ("Then", "Damals"), ("Now", "Jetzt")]))
                        tbody {
                            @for changed in report.changed.iter().take(500) {
                                tr {
                                    td { (changed.index) }
                                    td { (when(changed.received_at)) }
                                    td { (changed.caller) }
                                    td { (changed.evidence_type) }
                                    td { (changed.purpose) }
                                    td { code { (changed.subject) } }
                                    td { (changed.before) }
                                    td { (changed.after) }
                                }
                            }
                        }
                    }
                }
            }
            section aria-labelledby="apply" {
                h2 id="apply" { (lang.pick("Apply", "Anwenden")) }
                @if unchanged {
                    p { (lang.pick("This text is the policy in force; there is nothing to apply.", "Dieser Text ist das geltende Regelwerk; es gibt nichts anzuwenden.")) }
                } @else {
                    form method="post" action=(lang.link("/policy/apply")) {
                        input type="hidden" name="csrf" value=(viewer.csrf);
                        input type="hidden" name="base" value=(hex::encode(current.sha256()));
                        input type="hidden" name="text" value=(form.text);
                        p {
                            input id="confirm" type="checkbox" name="confirm" value="yes" required;
                            " "
                            label class="inline" for="confirm" {
                                (lang.pick(
                                    "I have reviewed these changes and apply this policy, replacing version",
                                    "Ich habe diese Änderungen geprüft und wende dieses Regelwerk an; es ersetzt Version"
                                )) " " (current.version()) "."
                            }
                        }
                        button type="submit" { (lang.pick("Apply the policy", "Regelwerk anwenden")) }
                    }
                }
                p { a href=(lang.link("/policy")) { (lang.pick("Back to the editor (the edit is not kept)", "Zurück zum Editor (die Änderung wird nicht gespeichert)")) } }
            }
        },
    )
    .into_response()
}

/// A form's text with the line ends of the policy file: browsers send a
/// textarea's lines ended by CR LF (HTML's form encoding), and the digest
/// in the log is of the file as an editor on the broker's host keeps it.
fn unix_lines(text: &str) -> String {
    text.replace("\r\n", "\n")
}

/// The records received since `since` (Unix seconds), with their
/// indexes, through the log's index, at most [`MOST_REPLAYED`]; and
/// whether there were more.
async fn logged_since(
    console: &Console,
    since: i64,
) -> Result<(Vec<(u64, AuditRecord)>, bool), crate::audit::AuditError> {
    let filter = crate::audit::AuditFilter {
        received_after: Some(since),
        ..crate::audit::AuditFilter::default()
    };
    let (records, more) = console
        .broker
        .records_matching(filter, MOST_REPLAYED, |_| true)
        .await?;
    Ok((
        records
            .into_iter()
            .map(|record| (record.log_index, record))
            .collect(),
        more,
    ))
}

/// `GET` of a form's target (a language switch, a reload): back to the
/// editor.
pub async fn to_editor(viewer: Viewer) -> axum::response::Redirect {
    axum::response::Redirect::to(&viewer.lang.link("/policy"))
}

/// What the apply form sends.
#[derive(Debug, Deserialize)]
pub struct ApplyForm {
    csrf: String,
    text: String,
    /// The digest of the policy the change was reviewed against.
    base: String,
    confirm: Option<String>,
}

/// `POST /policy/apply`: the reviewed text put in force, as this person.
pub async fn apply(
    viewer: Viewer,
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    uri: Uri,
    Form(form): Form<ApplyForm>,
) -> Response {
    if let Err(refusal) =
        viewer.permit_change(&[Role::PolicyAdmin], &console, &headers, &uri, &form.csrf)
    {
        return *refusal;
    }
    let lang = viewer.lang;
    if form.confirm.as_deref() != Some("yes") {
        return refused(
            lang,
            StatusCode::BAD_REQUEST,
            lang.pick(
                "Confirm that you reviewed the changes (the box above the button), then apply again. Nothing was applied.",
                "Bestätigen Sie, dass Sie die Änderungen geprüft haben (das Kästchen über der Schaltfläche), und wenden Sie dann erneut an. Nichts wurde angewendet.",
            ),
            None,
        );
    }
    let Some(base) = hex::decode(&form.base)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
    else {
        return refused(
            lang,
            StatusCode::BAD_REQUEST,
            lang.pick(
                "The form does not say which policy the change was reviewed against. Review the change again.",
                "Das Formular nennt nicht das Regelwerk, gegen das die Änderung geprüft wurde. Prüfen Sie die Änderung erneut.",
            ),
            None,
        );
    };
    let by = viewer.who.spiffe_id();
    let store = console.broker.policy.clone();
    let text = unix_lines(&form.text);
    let who = by.clone();
    // Three fsyncs under the store's lock: off the runtime.
    let applied = tokio::task::spawn_blocking(move || store.apply_text(&text, &base, &who)).await;
    let applied = match applied {
        Ok(applied) => applied,
        Err(error) => return failed(&viewer, &error),
    };
    match applied {
        Ok(policy) => {
            tracing::info!(%by, version = policy.version(), "policy applied from the console");
            // The person is told it is done once the entry naming them is
            // in the log (the broker's writer writes it; a crash before
            // that would lose the name).
            let deadline = tokio::time::Instant::now() + ENTRY_PATIENCE;
            while console.broker.policy.entry_pending(policy.version()) {
                if tokio::time::Instant::now() > deadline {
                    return failed(
                        &viewer,
                        &format!(
                            "version {} is in force, but the audit log has not taken its entry yet; the broker keeps trying (see its log)",
                            policy.version()
                        ),
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            layout(
                lang,
                Some(&viewer),
                lang.pick("Policy applied", "Regelwerk angewendet"),
                html! {
                    p class="ok" role="status" {
                        "✓ " (lang.pick("In force now: version", "Jetzt in Kraft: Version")) " "
                        strong id="applied-version" { (policy.version()) }
                        ". " (lang.pick(
                            "The audit log records who applied it, its digest and what changed.",
                            "Das Protokoll hält fest, wer es angewendet hat, seine Prüfsumme und was sich geändert hat."
                        ))
                    }
                    (in_force(&viewer, &policy))
                    p { a href=(lang.link("/policy")) { (lang.pick("Back to the policy", "Zurück zum Regelwerk")) } }
                },
            )
            .into_response()
        }
        Err(error) => {
            let status = match error {
                ApplyError::Changed { .. }
                | ApplyError::Unchanged
                | ApplyError::FileEdited { .. } => StatusCode::CONFLICT,
                ApplyError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            };
            refused(
                lang,
                status,
                lang.pick("Nothing was applied.", "Nichts wurde angewendet."),
                Some(&error.to_string()),
            )
        }
    }
}
