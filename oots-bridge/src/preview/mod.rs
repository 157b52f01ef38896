//! The citizen's preview (OOTS TDD 4.9): where the mapping asks for one and
//! the request allows it, the evidence is held here, not sent. The first
//! request is answered EDM:ERR:0002 with a `PreviewLocation`; the person
//! signs in there ([`sign_in`]), sees the evidence ([`web`]) and accepts or
//! declines; the second request of the exchange (same `ExchangeId`, the
//! `PreviewLocation`, a `ReturnLocation`) is answered only after that:
//! the evidence where accepted, an error and nothing sent where declined
//! or where the person did not come (T2) or decide (T3) in time.
//!
//! This module keeps the previews and their state; the bridge (module
//! `bridge`) acts on them (fetching, recording each step in the broker's
//! log, answering), and module `pages` serves the pages.
//!
//! - A preview's location carries 128 random bits: knowing it lets one
//!   start signing in, not see anything. Only the person the evidence is
//!   about, signed in at the level of assurance the evidence needs, sees
//!   it, in a browser session of its own (an HttpOnly, Secure cookie).
//! - The preview drops the evidence as soon as it was sent, declined or
//!   expired (the answer sent stays in the bridge's bounded memory of
//!   answers, for a request delivered again, as every answer does).
//! - One preview at a time per exchange (sender, `ExchangeId`); at most
//!   [`MOST_OPEN`] previews hold evidence at once, [`MOST_OPEN_PER_SENDER`]
//!   for one requester's access point; a first request beyond that is
//!   answered EDM:ERR:0005 (ask again later). Closed previews are kept for
//!   late second requests, then forgotten, the oldest first.

pub mod sign_in;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use base64::Engine;
use rand::RngCore;

use crate::edm::QueryRequest;
use crate::evidence::Fetched;
use crate::mapping::{Assurance, Entry};
use crate::transport::Message;

/// How many previews may hold evidence at once.
pub const MOST_OPEN: usize = 10_000;

/// How many of them one sender (a requester's access point) may hold.
pub const MOST_OPEN_PER_SENDER: usize = 1_000;

/// How many previews are kept at all, closed ones included.
const MOST_KEPT: usize = 4 * MOST_OPEN;

/// Where the preview pages are, and how long a person has.
#[derive(Debug, Clone)]
pub struct PreviewSettings {
    /// The pages' public address, e.g. `https://preview.example.de` (no
    /// trailing slash): a location is `<public_url>/preview/<token>`.
    pub public_url: String,
    /// T2: how long the person has to reach the preview and sign in.
    pub reach_within: Duration,
    /// T3: how long the person has to decide, once signed in.
    pub decide_within: Duration,
}

/// Where a preview stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Held; the person has not signed in yet (T2 runs).
    Offered,
    /// Shown to the person, who has not decided yet (T3 runs).
    Shown,
    /// Accepted; sent with the answer to the second request.
    Accepted,
    /// Declined: dropped, nothing sent.
    Declined,
    /// Not reached or not decided in time: dropped, nothing sent.
    Expired,
    /// Accepted and sent.
    Forwarded,
}

impl State {
    /// Whether the person may still decide.
    pub fn open(self) -> bool {
        matches!(self, State::Offered | State::Shown)
    }

    /// Whether the preview still holds the evidence.
    fn holds_evidence(self) -> bool {
        matches!(self, State::Offered | State::Shown | State::Accepted)
    }
}

/// The second request of a preview, held until the decision.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// The message as the access point delivered it.
    pub incoming: Message,
    /// The request it carries.
    pub request: QueryRequest,
    /// Its key in the bridge's memory of answers (sender, `@id`).
    pub key: (String, String),
    /// The digest of its document.
    pub digest: [u8; 32],
}

/// A person's browser session at one preview.
#[derive(Debug, Clone)]
pub struct Session {
    /// The cookie's value.
    pub id: String,
    /// The token the preview's forms carry (against cross-site posts).
    pub form_token: String,
}

/// One preview: the evidence held for one first request, whom it is
/// about, and what became of it.
#[derive(Debug)]
pub struct Preview {
    /// The random part of the location.
    pub token: String,
    /// The whole location, as sent in `PreviewLocation`.
    pub location: String,
    /// The first request's message (its sender, exchange and ids).
    pub first: Message,
    /// The first request.
    pub request: QueryRequest,
    /// What the mapping says of the evidence.
    pub entry: Entry,
    /// The evidence, until it is sent, declined or expired.
    pub evidence: Option<Fetched>,
    /// The broker's exchange that delivered it.
    pub exchange_id: String,
    /// Where it stands (change it with [`Preview::set_state`]).
    pub state: State,
    /// Whether it holds evidence, for the space's counts.
    holding: Arc<AtomicBool>,
    /// The person must have signed in by then (T2).
    pub reach_by: Instant,
    /// The person must have decided by then (T3, from signing in).
    pub decide_by: Option<Instant>,
    /// The signed-in person's browser session.
    pub session: Option<Session>,
    /// The second request, while it waits for the decision.
    pub waiting: Option<Waiting>,
    /// Where the requester wants the person sent back (from the second
    /// request), where it is an https address.
    pub return_location: Option<String>,
    /// When it was opened (for forgetting it).
    pub opened: Instant,
}

impl Preview {
    /// Whether the person's time ran out at `now` (T2 before signing in,
    /// T3 after); only an open preview can run out.
    pub fn overdue(&self, now: Instant) -> bool {
        match self.state {
            State::Offered => now >= self.reach_by,
            State::Shown => self.decide_by.is_some_and(|by| now >= by),
            _ => false,
        }
    }

    /// The level of assurance the evidence needs.
    pub fn needs(&self) -> Assurance {
        self.entry.level_of_assurance
    }

    /// Moves it to `state`; the evidence is dropped where it closes
    /// without sending.
    pub fn set_state(&mut self, state: State) {
        self.state = state;
        if matches!(state, State::Declined | State::Expired) {
            self.evidence = None;
        }
        self.holding.store(state.holds_evidence(), Ordering::SeqCst);
    }
}

/// Why no preview was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenRefusal {
    /// A preview of this exchange holds evidence already.
    ExchangeHasOne,
    /// Too many previews hold evidence (in all, or of this sender).
    Full,
}

/// A preview as the space keeps it.
struct Kept {
    held: Held,
    sender: String,
    exchange: String,
    opened: Instant,
    holding: Arc<AtomicBool>,
}

/// A preview, locked while one step of it runs (signing in, deciding,
/// answering), so two steps never interleave.
pub type Held = Arc<tokio::sync::Mutex<Preview>>;

/// The open previews, by token.
pub struct PreviewSpace {
    settings: PreviewSettings,
    previews: Mutex<HashMap<String, Kept>>,
}

/// Whether a secret a browser sent is `known`: their SHA-256 digests are
/// compared, so the time a comparison takes says nothing about the secret.
pub fn same_secret(known: &str, sent: &str) -> bool {
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    digest(known).as_ref() == digest(sent).as_ref()
}

/// 128 random bits, base64url.
pub fn random_token() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl PreviewSpace {
    /// An empty space.
    pub fn new(settings: PreviewSettings) -> Self {
        PreviewSpace {
            settings,
            previews: Mutex::new(HashMap::new()),
        }
    }

    /// Its settings.
    pub fn settings(&self) -> &PreviewSettings {
        &self.settings
    }

    fn previews(&self) -> std::sync::MutexGuard<'_, HashMap<String, Kept>> {
        self.previews.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a closed preview is kept for a late second request: longer
    /// than a requester waits (T2 + T3, and the minute OOTS gives the
    /// waiting side), twice.
    fn kept_for(&self) -> Duration {
        (self.settings.reach_within + self.settings.decide_within) * 2 + Duration::from_secs(120)
    }

    /// Forgets closed previews kept long enough, and the oldest closed
    /// ones beyond [`MOST_KEPT`].
    fn forget(&self, previews: &mut HashMap<String, Kept>) {
        let kept_for = self.kept_for();
        previews.retain(|_, kept| {
            kept.holding.load(Ordering::SeqCst) || kept.opened.elapsed() < kept_for
        });
        if previews.len() > MOST_KEPT {
            let mut closed: Vec<(Instant, String)> = previews
                .iter()
                .filter(|(_, kept)| !kept.holding.load(Ordering::SeqCst))
                .map(|(token, kept)| (kept.opened, token.clone()))
                .collect();
            closed.sort();
            for (_, token) in closed.into_iter().take(previews.len() - MOST_KEPT) {
                previews.remove(&token);
            }
        }
    }

    /// Opens a preview of `evidence` for the first request `request`.
    pub fn open(
        &self,
        first: &Message,
        request: &QueryRequest,
        entry: &Entry,
        evidence: Fetched,
    ) -> Result<Held, OpenRefusal> {
        let sender = first
            .property("originalSender")
            .unwrap_or_default()
            .to_owned();
        let exchange = first.property("ExchangeId").unwrap_or_default().to_owned();
        let mut previews = self.previews();
        self.forget(&mut previews);
        let holding: Vec<&Kept> = previews
            .values()
            .filter(|kept| kept.holding.load(Ordering::SeqCst))
            .collect();
        if holding
            .iter()
            .any(|kept| kept.sender == sender && kept.exchange == exchange)
        {
            return Err(OpenRefusal::ExchangeHasOne);
        }
        if holding.len() >= MOST_OPEN
            || holding.iter().filter(|kept| kept.sender == sender).count() >= MOST_OPEN_PER_SENDER
        {
            return Err(OpenRefusal::Full);
        }
        let token = random_token();
        let now = Instant::now();
        let holding = Arc::new(AtomicBool::new(true));
        let preview = Arc::new(tokio::sync::Mutex::new(Preview {
            location: format!("{}/preview/{token}", self.settings.public_url),
            token: token.clone(),
            first: Message {
                // The document is not needed again.
                payloads: Vec::new(),
                ..first.clone()
            },
            request: request.clone(),
            entry: entry.clone(),
            exchange_id: evidence.exchange_id.clone(),
            evidence: Some(evidence),
            state: State::Offered,
            holding: holding.clone(),
            reach_by: now + self.settings.reach_within,
            decide_by: None,
            session: None,
            waiting: None,
            return_location: None,
            opened: now,
        }));
        previews.insert(
            token,
            Kept {
                held: preview.clone(),
                sender,
                exchange,
                opened: now,
                holding,
            },
        );
        Ok(preview)
    }

    /// The preview of `token`.
    pub fn get(&self, token: &str) -> Option<Held> {
        self.previews().get(token).map(|kept| kept.held.clone())
    }

    /// The preview a `PreviewLocation` names, where it is one of this
    /// space's.
    pub fn at(&self, location: &str) -> Option<Held> {
        let prefix = format!("{}/preview/", self.settings.public_url);
        let token = location.trim().strip_prefix(&prefix)?;
        self.get(token)
    }

    /// Every preview that holds evidence, to look for the overdue.
    pub fn holding(&self) -> Vec<Held> {
        let mut previews = self.previews();
        self.forget(&mut previews);
        previews
            .values()
            .filter(|kept| kept.holding.load(Ordering::SeqCst))
            .map(|kept| kept.held.clone())
            .collect()
    }

    /// How many previews are kept.
    pub fn len(&self) -> usize {
        self.previews().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The page's language: German, or English.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// Deutsch.
    De,
    /// English.
    En,
}

impl Lang {
    /// `en` or `de` of the two.
    pub fn pick(self, en: &'static str, de: &'static str) -> &'static str {
        match self {
            Lang::En => en,
            Lang::De => de,
        }
    }

    /// `en` or `de`.
    pub fn code(self) -> &'static str {
        self.pick("en", "de")
    }

    /// `?lang=` where given, else the browser's first choice of the two,
    /// else German.
    pub fn of(query: &HashMap<String, String>, headers: &HeaderMap) -> Lang {
        let asked = query.get("lang").map(String::as_str).or_else(|| {
            headers
                .get(header::ACCEPT_LANGUAGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.split(',')
                        .map(|l| l.trim().get(..2).unwrap_or_default())
                        .find(|l| matches!(*l, "de" | "en"))
                })
        });
        match asked {
            Some("en") => Lang::En,
            _ => Lang::De,
        }
    }
}
