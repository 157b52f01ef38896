//! The citizen's preview pages ([`crate::preview`]): server-rendered HTML in German and English, no
//! script, served over TLS to the person's own browser.
//!
//! - `GET /preview/<token>`: the sign-in ([`SignIn`]), then the evidence
//!   with "send" and "do not send", then what became of it;
//! - `POST /preview/<token>/sign-in`, `POST /preview/<token>/decision`:
//!   taken only from the pages' own origin; a decision also carries the
//!   session's form token, and the session is a `__Host-` cookie
//!   (Secure, HttpOnly, SameSite=Lax) of this preview alone;
//! - `GET /preview/<token>/evidence`: the evidence to download, where it
//!   is not text to show in the page.
//!
//! Every answer carries a Content-Security-Policy without script,
//! `no-store`, and no framing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use maud::{DOCTYPE, Markup, html};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::bridge::{Bridge, EvidenceSource, PreviewRefusal};
use crate::preview::sign_in::{Challenge, SignIn};
use crate::preview::{Held, Lang, Preview, State as Stage, same_secret};
use crate::transport::Transport;

/// What every answer allows: its own stylesheet, forms posting to itself,
/// no script, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// How long a client has to send a request's headers, or finish its TLS
/// handshake.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many connections at once.
const MOST_CONNECTIONS: usize = 1024;

/// At most this many of them from one address.
const MOST_CONNECTIONS_PER_PEER: usize = 16;

/// How long one connection may last (a page and its stylesheet take
/// seconds; browsers connect again).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// The largest form taken.
const MAX_FORM: usize = 8 * 1024;

struct App<T, S> {
    bridge: Arc<Bridge<T, S>>,
    sign_in: Arc<dyn SignIn>,
    /// `scheme://host[:port]` of the public address.
    origin: String,
}

impl<T: Transport, S: EvidenceSource> App<T, S> {
    /// The preview of `token`.
    fn held(&self, token: &str) -> Option<Held> {
        self.bridge
            .preview_space()
            .and_then(|space| space.get(token))
    }
}

/// The pages' routes.
pub fn router<T, S>(bridge: Arc<Bridge<T, S>>, sign_in: Arc<dyn SignIn>) -> Router
where
    T: Transport + 'static,
    S: EvidenceSource + 'static,
{
    let public_url = bridge
        .preview_space()
        .map(|space| space.settings().public_url.clone())
        .unwrap_or_default();
    let origin = public_url
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?)))
        .unwrap_or_default();
    let app = Arc::new(App {
        bridge,
        sign_in,
        origin,
    });
    Router::new()
        .route("/preview.css", get(stylesheet))
        .route("/preview/{token}", get(page::<T, S>))
        .route("/preview/{token}/sign-in", post(signed_in::<T, S>))
        .route("/preview/{token}/decision", post(decision::<T, S>))
        .route("/preview/{token}/evidence", get(download::<T, S>))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(app)
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    response
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("pages.css"),
    )
        .into_response()
}

fn layout(lang: Lang, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang=(lang.code()) {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " – " (lang.pick("Evidence preview", "Nachweisvorschau")) }
                link rel="stylesheet" href="/preview.css";
            }
            body {
                a class="skip" href="#main" { (lang.pick("Skip to content", "Zum Inhalt springen")) }
                header {
                    p class="service" { (lang.pick(
                        "Evidence preview · EU Once-Only Technical System",
                        "Nachweisvorschau · EU-Once-Only-Technical-System",
                    )) }
                    nav aria-label=(lang.pick("Language", "Sprache")) {
                        a href="?lang=de" lang="de" hreflang="de" { "Deutsch" }
                        " · "
                        a href="?lang=en" lang="en" hreflang="en" { "English" }
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

fn page_response(status: StatusCode, lang: Lang, title: &str, body: Markup) -> Response {
    (status, layout(lang, title, body)).into_response()
}

async fn not_found(Query(query): Query<HashMap<String, String>>, headers: HeaderMap) -> Response {
    let lang = Lang::of(&query, &headers);
    unknown(lang)
}

fn unknown(lang: Lang) -> Response {
    page_response(
        StatusCode::NOT_FOUND,
        lang,
        lang.pick("No such preview", "Keine solche Vorschau"),
        html! {
            p { (lang.pick(
                "This address names no open preview. It may have been closed: return to the portal where you started your request.",
                "Diese Adresse gehört zu keiner offenen Vorschau. Vielleicht ist sie bereits geschlossen: Kehren Sie zum Portal zurück, in dem Sie Ihren Antrag begonnen haben.",
            )) }
        },
    )
}

/// The session cookie's name for `token`.
fn cookie_name(token: &str) -> String {
    format!("__Host-preview-{token}")
}

/// The session id the browser sent for `token`.
fn session_of(headers: &HeaderMap, token: &str) -> Option<String> {
    let name = cookie_name(token);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
}

fn same_session(preview: &Preview, session: Option<&str>) -> bool {
    match (&preview.session, session) {
        (Some(own), Some(sent)) => same_secret(&own.id, sent),
        _ => false,
    }
}

/// Whether a POST came from the pages themselves.
fn from_own_origin(headers: &HeaderMap, origin: &str) -> bool {
    let sent = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    sent == Some(origin) && site.is_none_or(|s| s == "same-origin")
}

fn minutes_left(until: Option<Instant>) -> u64 {
    until
        .map(|by| {
            by.saturating_duration_since(Instant::now())
                .as_secs()
                .div_ceil(60)
        })
        .unwrap_or_default()
}

/// Whether `format` is text a page can show.
fn textual(format: &str) -> bool {
    let format = format.to_ascii_lowercase();
    format.starts_with("text/") || format.contains("xml") || format.contains("json")
}

async fn page<T, S>(
    State(app): State<Arc<App<T, S>>>,
    Path(token): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response
where
    T: Transport + 'static,
    S: EvidenceSource + 'static,
{
    let lang = Lang::of(&query, &headers);
    let Some(held) = app.held(&token) else {
        return unknown(lang);
    };
    let session = session_of(&headers, &token);
    let preview = held.lock().await;
    let signed_in = same_session(&preview, session.as_deref());
    let overdue = preview.overdue(Instant::now());
    if !signed_in {
        if !preview.state.open() || overdue {
            return closed(lang, &preview, false);
        }
        let continue_to = format!("/preview/{token}/sign-in?lang={}", lang.code());
        return match app.sign_in.challenge(lang, &continue_to) {
            Challenge::Redirect(to) => Redirect::to(&to).into_response(),
            Challenge::Form(form) => page_response(
                StatusCode::OK,
                lang,
                lang.pick(
                    "Sign in to see the evidence",
                    "Melden Sie sich an, um den Nachweis zu sehen",
                ),
                html! {
                    p { (lang.pick(
                        "An authority in another EU member state asks for evidence about you, through the EU Once-Only Technical System. Before anything is sent, you see it here and decide.",
                        "Eine Behörde in einem anderen EU-Mitgliedstaat bittet über das EU-Once-Only-Technical-System um einen Nachweis über Sie. Bevor etwas gesendet wird, sehen Sie ihn hier und entscheiden selbst.",
                    )) }
                    (form)
                },
            ),
        };
    }
    if overdue || preview.state != Stage::Shown {
        return closed(lang, &preview, true);
    }
    let request = &preview.request;
    let form_token = preview
        .session
        .as_ref()
        .map(|s| s.form_token.clone())
        .unwrap_or_default();
    let format = &preview.entry.format;
    let shown = preview
        .evidence
        .as_ref()
        .filter(|_| textual(format))
        .and_then(|e| std::str::from_utf8(&e.bytes).ok());
    let issuer = preview
        .evidence
        .as_ref()
        .map(|e| e.issuing_authority.name.clone())
        .unwrap_or_default();
    page_response(
        StatusCode::OK,
        lang,
        lang.pick(
            "Your evidence, before it is sent",
            "Ihr Nachweis, bevor er gesendet wird",
        ),
        html! {
            dl {
                dt { (lang.pick("Requested by (as the request states)", "Angefordert von (laut Anfrage)")) }
                dd { (request.requester.name) " (" (request.requester.identifier) ")" }
                dt { (lang.pick("Sent through the access point of", "Gesendet über den Zugangspunkt von")) }
                dd { (preview.first.property("originalSender").unwrap_or_default()) }
                dt { (lang.pick("Evidence", "Nachweis")) }
                dd { (preview.entry.evidence_type) " – " (request.evidence.title) }
                dt { (lang.pick("For the procedure", "Für das Verfahren")) }
                dd { (request.procedure) }
                dt { (lang.pick("Issued by", "Ausgestellt von")) }
                dd { (issuer) }
            }
            h2 { (lang.pick("The evidence", "Der Nachweis")) }
            @if let Some(text) = shown {
                pre class="evidence" tabindex="0" aria-label=(lang.pick("The evidence", "Der Nachweis")) { (text) }
            } @else {
                p {
                    a href={ "/preview/" (preview.token) "/evidence" } { (lang.pick("Download the evidence", "Nachweis herunterladen")) }
                    " (" (format) ")"
                }
            }
            h2 { (lang.pick("Your decision", "Ihre Entscheidung")) }
            p { (lang.pick("You have this many minutes left to decide: ", "So viele Minuten bleiben Ihnen für die Entscheidung: ")) strong { (minutes_left(preview.decide_by)) } }
            p { (lang.pick(
                "If you do not decide in time, nothing is sent.",
                "Wenn Sie nicht rechtzeitig entscheiden, wird nichts gesendet.",
            )) }
            form method="post" action={ "/preview/" (preview.token) "/decision?lang=" (lang.code()) } class="decision" {
                input type="hidden" name="form_token" value=(form_token);
                button type="submit" name="choice" value="accept" id="accept" { (lang.pick("Send this evidence", "Diesen Nachweis senden")) }
                button type="submit" name="choice" value="decline" id="decline" class="secondary" { (lang.pick("Do not send it", "Nicht senden")) }
            }
        },
    )
}

/// What became of a closed preview; with its outcome for the person
/// signed in, without for anyone else.
fn closed(lang: Lang, preview: &Preview, signed_in: bool) -> Response {
    let overdue = preview.overdue(Instant::now());
    let (title, says) = match (preview.state, overdue) {
        (_, true) | (Stage::Expired, _) => (
            lang.pick("Time ran out", "Die Zeit ist abgelaufen"),
            lang.pick(
                "You did not decide in time, so nothing was sent.",
                "Sie haben nicht rechtzeitig entschieden; es wurde nichts gesendet.",
            ),
        ),
        (Stage::Declined, _) => (
            lang.pick("Not sent", "Nicht gesendet"),
            lang.pick(
                "You declined: the evidence was not sent, and is no longer held here.",
                "Sie haben abgelehnt: Der Nachweis wurde nicht gesendet und wird hier nicht mehr vorgehalten.",
            ),
        ),
        (Stage::Accepted | Stage::Forwarded, _) => (
            lang.pick("Sent", "Gesendet"),
            lang.pick(
                "You accepted: the evidence goes to the requesting authority (it is sent as soon as its portal asks).",
                "Sie haben zugestimmt: Der Nachweis geht an die anfragende Behörde (er wird gesendet, sobald ihr Portal ihn abruft).",
            ),
        ),
        (Stage::Offered | Stage::Shown, false) => (
            lang.pick("Sign in first", "Bitte zuerst anmelden"),
            lang.pick(
                "Sign in to see the evidence.",
                "Melden Sie sich an, um den Nachweis zu sehen.",
            ),
        ),
    };
    page_response(
        StatusCode::OK,
        lang,
        title,
        html! {
            @if signed_in {
                p role="status" { (says) }
                @if let Some(back) = &preview.return_location {
                    p { a href=(back) { (lang.pick("Back to the portal", "Zurück zum Portal")) } }
                } @else {
                    p { (lang.pick("You may now return to the portal where you started.", "Sie können jetzt zu dem Portal zurückkehren, in dem Sie begonnen haben.")) }
                }
            } @else {
                p role="status" { (lang.pick("This preview is closed.", "Diese Vorschau ist geschlossen.")) }
            }
        },
    )
}

fn refusal_page(lang: Lang, refusal: &PreviewRefusal) -> Response {
    let (status, title, says) = match refusal {
        PreviewRefusal::TooLate | PreviewRefusal::Closed(Stage::Expired) => (
            StatusCode::GONE,
            lang.pick("Time ran out", "Die Zeit ist abgelaufen"),
            lang.pick(
                "The time for this preview ran out, so nothing was sent.",
                "Die Zeit für diese Vorschau ist abgelaufen; es wurde nichts gesendet.",
            ),
        ),
        PreviewRefusal::Closed(_) => (
            StatusCode::CONFLICT,
            lang.pick("Already decided", "Bereits entschieden"),
            lang.pick(
                "This preview is closed already; nothing changed.",
                "Diese Vorschau ist bereits geschlossen; nichts wurde geändert.",
            ),
        ),
        PreviewRefusal::NotTheirs => (
            StatusCode::FORBIDDEN,
            lang.pick("Not your evidence", "Nicht Ihr Nachweis"),
            lang.pick(
                "You signed in as someone the evidence is not about, so it is not shown. Only the person it is about can see it.",
                "Sie haben sich als eine Person angemeldet, die der Nachweis nicht betrifft; er wird daher nicht gezeigt. Nur die betroffene Person kann ihn sehen.",
            ),
        ),
        PreviewRefusal::TooWeak => (
            StatusCode::FORBIDDEN,
            lang.pick("A stronger sign-in is needed", "Eine stärkere Anmeldung ist nötig"),
            lang.pick(
                "This evidence needs a sign-in at a higher level of assurance. Sign in with an eID that reaches it.",
                "Dieser Nachweis erfordert eine Anmeldung mit höherem Vertrauensniveau. Melden Sie sich mit einer eID an, die es erreicht.",
            ),
        ),
        PreviewRefusal::NotSignedIn => (
            StatusCode::FORBIDDEN,
            lang.pick("Sign in first", "Bitte zuerst anmelden"),
            lang.pick(
                "Your decision was not taken: this browser is not signed in to this preview, or the form did not come from this page.",
                "Ihre Entscheidung wurde nicht übernommen: Dieser Browser ist bei dieser Vorschau nicht angemeldet, oder das Formular kam nicht von dieser Seite.",
            ),
        ),
        PreviewRefusal::NotRecorded => (
            StatusCode::SERVICE_UNAVAILABLE,
            lang.pick("Please try again", "Bitte versuchen Sie es erneut"),
            lang.pick(
                "This step could not be recorded, so it was not taken. Nothing was sent. Try again in a moment.",
                "Dieser Schritt konnte nicht protokolliert werden und wurde daher nicht ausgeführt. Es wurde nichts gesendet. Versuchen Sie es gleich noch einmal.",
            ),
        ),
    };
    page_response(status, lang, title, html! { p role="alert" { (says) } })
}

async fn signed_in<T, S>(
    State(app): State<Arc<App<T, S>>>,
    Path(token): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response
where
    T: Transport + 'static,
    S: EvidenceSource + 'static,
{
    let lang = Lang::of(&query, &headers);
    let Some(held) = app.held(&token) else {
        return unknown(lang);
    };
    if !from_own_origin(&headers, &app.origin) {
        return refusal_page(lang, &PreviewRefusal::NotSignedIn);
    }
    let person = match app.sign_in.verify(&form) {
        Ok(person) => person,
        Err(refused) => {
            return page_response(
                StatusCode::UNAUTHORIZED,
                lang,
                lang.pick("Sign-in failed", "Anmeldung fehlgeschlagen"),
                html! {
                    p role="alert" { (lang.pick("The sign-in did not succeed: ", "Die Anmeldung ist nicht gelungen: ")) (refused.0) }
                    p { a href={ "/preview/" (token) "?lang=" (lang.code()) } { (lang.pick("Try again", "Erneut versuchen")) } }
                },
            );
        }
    };
    // In a task of its own: a browser that goes away cannot stop a step
    // between its record and its effect.
    let (bridge, step_held) = (app.bridge.clone(), held.clone());
    let signed = tokio::spawn(async move { bridge.sign_in(&step_held, &person).await })
        .await
        .unwrap_or(Err(PreviewRefusal::NotRecorded));
    match signed {
        Ok(session) => {
            let cookie = format!(
                "{}={}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={}",
                cookie_name(&token),
                session.id,
                max_age(&held).await
            );
            let mut response =
                Redirect::to(&format!("/preview/{token}?lang={}", lang.code())).into_response();
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            response
        }
        Err(refusal) => refusal_page(lang, &refusal),
    }
}

/// How long the session cookie lives: until the preview's decision is
/// due, and a while after, so that the person still learns what became of
/// it.
async fn max_age(held: &Held) -> u64 {
    let preview = held.lock().await;
    preview
        .decide_by
        .map(|by| by.saturating_duration_since(Instant::now()).as_secs())
        .unwrap_or_default()
        + 600
}

async fn decision<T, S>(
    State(app): State<Arc<App<T, S>>>,
    Path(token): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response
where
    T: Transport + 'static,
    S: EvidenceSource + 'static,
{
    let lang = Lang::of(&query, &headers);
    let Some(held) = app.held(&token) else {
        return unknown(lang);
    };
    let Some(session) = session_of(&headers, &token) else {
        return refusal_page(lang, &PreviewRefusal::NotSignedIn);
    };
    let token_ok = {
        let preview = held.lock().await;
        let sent = form
            .get("form_token")
            .map(String::as_str)
            .unwrap_or_default();
        preview
            .session
            .as_ref()
            .is_some_and(|s| same_secret(&s.form_token, sent))
    };
    if !token_ok || !from_own_origin(&headers, &app.origin) {
        return refusal_page(lang, &PreviewRefusal::NotSignedIn);
    }
    let accept = match form.get("choice").map(String::as_str) {
        Some("accept") => true,
        Some("decline") => false,
        _ => {
            return page_response(
                StatusCode::BAD_REQUEST,
                lang,
                lang.pick("No decision", "Keine Entscheidung"),
                html! { p role="alert" { (lang.pick("Choose to send the evidence or not.", "Wählen Sie, ob der Nachweis gesendet werden soll.")) } },
            );
        }
    };
    let (bridge, step_held) = (app.bridge.clone(), held.clone());
    let decided = tokio::spawn(async move { bridge.decide(&step_held, &session, accept).await })
        .await
        .unwrap_or(Err(PreviewRefusal::NotRecorded));
    match decided {
        Ok(_) => Redirect::to(&format!("/preview/{token}?lang={}", lang.code())).into_response(),
        Err(refusal) => refusal_page(lang, &refusal),
    }
}

async fn download<T, S>(
    State(app): State<Arc<App<T, S>>>,
    Path(token): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response
where
    T: Transport + 'static,
    S: EvidenceSource + 'static,
{
    let lang = Lang::of(&query, &headers);
    let Some(held) = app.held(&token) else {
        return unknown(lang);
    };
    let session = session_of(&headers, &token);
    let preview = held.lock().await;
    if !same_session(&preview, session.as_deref())
        || preview.state != Stage::Shown
        || preview.overdue(Instant::now())
    {
        return refusal_page(lang, &PreviewRefusal::NotSignedIn);
    }
    let Some(evidence) = &preview.evidence else {
        return closed(lang, &preview, true);
    };
    let mime = HeaderValue::from_str(&preview.entry.format)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    (
        [
            (header::CONTENT_TYPE, mime),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_static("attachment; filename=\"evidence\""),
            ),
        ],
        evidence.bytes.clone(),
    )
        .into_response()
}

/// Serves the pages of `bridge` on `listener` over TLS (`tls`) until the
/// task is aborted.
pub fn spawn<T, S>(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    bridge: Arc<Bridge<T, S>>,
    sign_in: Arc<dyn SignIn>,
) -> JoinHandle<()>
where
    T: Transport + 'static,
    S: EvidenceSource + 'static,
{
    let app = router(bridge, sign_in);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let slots = Arc::new(tokio::sync::Semaphore::new(MOST_CONNECTIONS));
    let per_peer = Arc::new(std::sync::Mutex::new(
        HashMap::<std::net::IpAddr, usize>::new(),
    ));
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (stream, peer): (tokio::net::TcpStream, SocketAddr) = match listener.accept().await
            {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "preview: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "preview: too many connections; refused");
                continue;
            };
            let Some(peer_slot) = PeerSlot::take(&per_peer, peer.ip()) else {
                tracing::warn!(%peer, "preview: too many connections from one address; refused");
                continue;
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            connections.spawn(async move {
                let _slots = (slot, peer_slot);
                let stream = match tokio::time::timeout(
                    HEADER_READ_TIMEOUT,
                    acceptor.accept(stream),
                )
                .await
                {
                    Ok(Ok(stream)) => stream,
                    _ => return,
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT);
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(32)
                    .keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(HEADER_READ_TIMEOUT);
                let served = tokio::time::timeout(
                    CONNECTION_LIFETIME,
                    builder.serve_connection(TokioIo::new(stream), service),
                )
                .await;
                if let Ok(Err(error)) = served {
                    tracing::debug!(%error, "preview connection ended");
                }
            });
            while connections.try_join_next().is_some() {}
        }
    })
}

/// One of an address's connections, given back when dropped.
struct PeerSlot {
    counts: Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>,
    peer: std::net::IpAddr,
}

impl PeerSlot {
    fn take(
        counts: &Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>,
        peer: std::net::IpAddr,
    ) -> Option<PeerSlot> {
        let mut all = counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = all.entry(peer).or_default();
        if *count >= MOST_CONNECTIONS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            counts: counts.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut all = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = all.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                all.remove(&self.peer);
            }
        }
    }
}
