//! How a person proves who they are at the preview: behind [`SignIn`], so
//! that an eID service (eIDAS node, a national eID) is one more
//! implementation. The bridge ships [`TestSignIn`] only: a form asking for
//! a code the test gave out. A real eID integration is out of scope (see
//! THREAT_MODEL.md); in service, the preview is only as strong as the
//! sign-in behind it.

use std::collections::HashMap;

use maud::{Markup, html};

use super::Lang;
use crate::mapping::Assurance;

/// A person as a sign-in proved them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// Their eIDAS unique identifier (e.g. `DE/AT/7f3c...`).
    pub identifier: String,
    /// The level of assurance the sign-in reached.
    pub level_of_assurance: Assurance,
}

/// What the preview page does to have a person sign in.
pub enum Challenge {
    /// Shows this form (it posts to `continue_to`).
    Form(Markup),
    /// Sends the browser on, to an eID service that returns to
    /// `continue_to`.
    Redirect(String),
}

/// Why a sign-in did not prove anyone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SignInRefused(pub String);

/// A way for a person to sign in.
pub trait SignIn: Send + Sync + 'static {
    /// What to show or where to send the person, who comes back with the
    /// proof to `continue_to` (a POST of a form).
    fn challenge(&self, lang: Lang, continue_to: &str) -> Challenge;

    /// The person the form posted to `continue_to` proves.
    fn verify(&self, form: &HashMap<String, String>) -> Result<Person, SignInRefused>;
}

/// For tests and demonstrations only: a person signs in with a code given
/// out beforehand ([`TestSignIn::with`]). Anyone with a code is that
/// person; never use it in service.
#[derive(Debug, Default, Clone)]
pub struct TestSignIn {
    codes: HashMap<String, Person>,
}

impl TestSignIn {
    /// A sign-in knowing `codes`.
    pub fn with(codes: impl IntoIterator<Item = (String, Person)>) -> Self {
        TestSignIn {
            codes: codes.into_iter().collect(),
        }
    }
}

impl SignIn for TestSignIn {
    fn challenge(&self, lang: Lang, continue_to: &str) -> Challenge {
        Challenge::Form(html! {
            form method="post" action=(continue_to) {
                p { (lang.pick(
                    "Test sign-in: enter the code you were given. (In service, your national eID takes its place.)",
                    "Test-Anmeldung: Geben Sie den Code ein, den Sie erhalten haben. (Im Betrieb tritt Ihre nationale eID an diese Stelle.)",
                )) }
                label for="code" { (lang.pick("Sign-in code", "Anmeldecode")) }
                input id="code" name="code" type="password" autocomplete="off" required;
                button type="submit" id="sign-in" { (lang.pick("Sign in", "Anmelden")) }
            }
        })
    }

    fn verify(&self, form: &HashMap<String, String>) -> Result<Person, SignInRefused> {
        let code = form.get("code").map(|c| c.trim()).unwrap_or_default();
        // Compared in constant time, each code, so timing says nothing.
        let mut found = None;
        for (known, person) in &self.codes {
            if super::same_secret(known, code) {
                found = Some(person.clone());
            }
        }
        found.ok_or_else(|| SignInRefused("this code is not known".into()))
    }
}
