//! The console's frame: the layout every page shares (landmarks, a skip
//! link, the language switch), the language a page is in, the stylesheet,
//! and the pages that are not about the policy or the log (home, refusals,
//! not found).
//!
//! Accessibility (WCAG 2.1 AA, as BITV 2.0 asks of German authorities):
//! the page's language is declared, every page has a title, a `main`
//! landmark and one `h1`; every form field has a label; tables have
//! header cells; results are said in words, never by colour alone; text
//! and focus outlines have at least 4.5:1 contrast.

use std::sync::Arc;

use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};
use onceonly_certs::Role;

use super::{Console, Viewer};

/// The language of a page: German or English, from `?lang=`, else the
/// browser's first choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// Deutsch.
    De,
    /// English.
    En,
}

impl Lang {
    /// The language `parts` asks for.
    pub fn of(parts: &Parts) -> Lang {
        let asked = parts.uri.query().and_then(|query| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix("lang="))
                .and_then(Lang::from_code)
        });
        asked.unwrap_or_else(|| {
            let accepted = parts
                .headers
                .get(header::ACCEPT_LANGUAGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            match accepted.trim_start().get(..2) {
                Some(code) if code.eq_ignore_ascii_case("de") => Lang::De,
                _ => Lang::En,
            }
        })
    }

    fn from_code(code: &str) -> Option<Lang> {
        match code {
            "de" => Some(Lang::De),
            "en" => Some(Lang::En),
            _ => None,
        }
    }

    /// The language's code, as in `lang` attributes.
    pub fn code(self) -> &'static str {
        match self {
            Lang::De => "de",
            Lang::En => "en",
        }
    }

    /// The English or the German text.
    pub fn pick<'a>(self, en: &'a str, de: &'a str) -> &'a str {
        match self {
            Lang::De => de,
            Lang::En => en,
        }
    }

    /// `path` with this language kept.
    pub fn link(self, path: &str) -> String {
        let join = if path.contains('?') { '&' } else { '?' };
        format!("{path}{join}lang={}", self.code())
    }
}

/// A whole page: `title`, and `body` inside the shared frame. `viewer`
/// names who is looking and which sections are theirs.
pub fn layout(lang: Lang, viewer: Option<&Viewer>, title: &str, body: Markup) -> Markup {
    let other = match lang {
        Lang::De => Lang::En,
        Lang::En => Lang::De,
    };
    html! {
        (DOCTYPE)
        html lang=(lang.code()) {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · onceonly" }
                link rel="stylesheet" href="/console.css";
            }
            body {
                a class="skip" href="#main" { (lang.pick("Skip to content", "Zum Inhalt springen")) }
                header {
                    p class="brand" { a href=(lang.link("/")) { "onceonly " (lang.pick("console", "Konsole")) } }
                    @if let Some(viewer) = viewer {
                        nav aria-label=(lang.pick("Sections", "Bereiche")) {
                            ul {
                                @for (path, en, de) in sections(viewer.who.role()) {
                                    li { a href=(lang.link(path)) { (lang.pick(en, de)) } }
                                }
                            }
                        }
                        p class="who" {
                            (lang.pick("Signed in by certificate as", "Angemeldet per Zertifikat als"))
                            " " code { (viewer.who.spiffe_id()) }
                        }
                    }
                    p class="language" {
                        a href=(other.link("")) lang=(other.code()) hreflang=(other.code()) {
                            (other.pick("English", "Deutsch"))
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// The sections a role may open: (path, English, German).
fn sections(role: Role) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut sections = Vec::new();
    if role == Role::PolicyAdmin {
        sections.push(("/policy", "Policy", "Regelwerk"));
    }
    if role == Role::Auditor {
        sections.push(("/records", "Audit log", "Protokoll"));
        sections.push(("/consistency", "Consistency", "Konsistenz"));
    }
    if role == Role::Auditor {
        sections.push(("/history", "A citizen's history", "Verlauf einer Person"));
    }
    sections
}

/// A refusal: what happened and what to do, and the technical reason.
pub fn refused(lang: Lang, status: StatusCode, message: &str, reason: Option<&str>) -> Response {
    let title = lang.pick("Refused", "Abgelehnt");
    let body = html! {
        p role="alert" { (message) }
        @if let Some(reason) = reason {
            p { (lang.pick("Reason:", "Grund:")) " " (reason) }
        }
    };
    (status, layout(lang, None, title, body)).into_response()
}

/// A page that could not be shown for a reason that is not the person's
/// (the log could not be read, say).
pub fn failed(viewer: &Viewer, error: &dyn std::fmt::Display) -> Response {
    let lang = viewer.lang;
    let body = html! {
        p role="alert" {
            (lang.pick("The broker could not answer this page:", "Der Broker konnte diese Seite nicht beantworten:"))
            " " (error.to_string())
        }
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        layout(
            lang,
            Some(viewer),
            lang.pick("Not available", "Nicht verfügbar"),
            body,
        ),
    )
        .into_response()
}

/// `/`: who is looking, and their sections.
pub async fn home(viewer: Viewer) -> Markup {
    let lang = viewer.lang;
    let sections = sections(viewer.who.role());
    layout(
        lang,
        Some(&viewer),
        lang.pick("Console", "Konsole"),
        html! {
            p {
                (lang.pick("Your role:", "Ihre Rolle:")) " " strong { (viewer.who.role()) }
            }
            @if sections.is_empty() {
                p { (lang.pick(
                    "The console has no section for this role. It is for policy staff (policy-admin) and for auditors and data-protection officers (auditor).",
                    "Die Konsole hat keinen Bereich für diese Rolle. Sie ist für Regelwerk-Verantwortliche (policy-admin) sowie Prüfer und Datenschutzbeauftragte (auditor)."
                )) }
            } @else {
                ul {
                    @for (path, en, de) in &sections {
                        li { a href=(lang.link(path)) { (lang.pick(en, de)) } }
                    }
                }
            }
        },
    )
}

/// `/console.css`.
pub async fn stylesheet(State(_): State<Arc<Console>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("console.css"),
    )
        .into_response()
}

/// Anything else.
pub async fn not_found(viewer: Viewer) -> Response {
    let lang = viewer.lang;
    (
        StatusCode::NOT_FOUND,
        layout(
            lang,
            Some(&viewer),
            lang.pick("Not found", "Nicht gefunden"),
            html! { p { a href=(lang.link("/")) { (lang.pick("To the start page", "Zur Startseite")) } } },
        ),
    )
        .into_response()
}

/// Unix seconds as a date and time people read (UTC).
pub fn when(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            let format = time::format_description::parse_borrowed::<2>(
                "[year]-[month]-[day] [hour]:[minute]:[second] UTC",
            )
            .ok()?;
            t.format(&format).ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// A table's header row: one column header per (English, German) label.
pub fn header_row(lang: Lang, columns: &[(&str, &str)]) -> Markup {
    html! {
        thead { tr {
            @for (en, de) in columns {
                th scope="col" { (lang.pick(en, de)) }
            }
        } }
    }
}
