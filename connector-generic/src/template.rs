//! The evidence document: a minijinja template rendered with one match's
//! fields, the subject and the parameters. What it inserts is escaped for
//! the document's format (JSON values are serialised, so a quote in a
//! register's data cannot end a string; XML text is escaped), and a JSON
//! document must parse before it is released.

use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};
use serde_json::Map;

use crate::lookup::{LookupError, Values};

/// An environment whose templates escape for `format_of(name)`.
fn environment(format_of: impl Fn(&str) -> Format + Send + Sync + 'static) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(move |name| match format_of(name) {
        Format::Json => AutoEscape::Json,
        Format::Xml => AutoEscape::Html,
    });
    // A field the template names but the match lacks is an error, not an
    // empty string in a certificate.
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env
}

/// Checks that `template` parses (when the mapping is loaded).
pub fn check(template: &str, format: Format) -> Result<(), String> {
    environment(move |_| format)
        .template_from_str(template)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A mapping's templates, parsed once when it is loaded (not once per
/// lookup), each with the format it escapes for.
pub struct Templates {
    env: Environment<'static>,
    formats: std::sync::Arc<std::collections::HashMap<String, Format>>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates")
            .field("names", &self.formats.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Templates {
    /// Parses `templates`, each (name, text, format).
    pub fn new(templates: Vec<(String, String, Format)>) -> Result<Templates, String> {
        let formats: std::sync::Arc<std::collections::HashMap<String, Format>> =
            std::sync::Arc::new(
                templates
                    .iter()
                    .map(|(name, _, format)| (name.clone(), *format))
                    .collect(),
            );
        let of = formats.clone();
        let mut env = environment(move |name| of.get(name).copied().unwrap_or(Format::Json));
        for (name, text, _) in templates {
            env.add_template_owned(name.clone(), text)
                .map_err(|e| format!("template {name}: {e}"))?;
        }
        Ok(Templates { env, formats })
    }

    /// Renders template `name` for one match: `fields` (already picked)
    /// at the top level, beside `subject` and the parameters (a field of
    /// the same name wins).
    pub fn render(
        &self,
        name: &str,
        fields: Map<String, serde_json::Value>,
        values: &Values,
    ) -> Result<Vec<u8>, LookupError> {
        let format = *self
            .formats
            .get(name)
            .ok_or_else(|| LookupError::Internal(format!("no template {name}")))?;
        let mut context: Map<String, serde_json::Value> = values
            .all()
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.clone())))
            .collect();
        context.extend(fields);
        let rendered = self
            .env
            .get_template(name)
            .and_then(|t| t.render(Value::from_serialize(&context)))
            .map_err(|e| LookupError::Internal(format!("the template does not render: {e:#}")))?;
        if format == Format::Json
            && let Err(e) = serde_json::from_str::<serde_json::Value>(&rendered)
        {
            return Err(LookupError::Internal(format!(
                "the template renders no valid JSON ({e}); check its quoting: {{{{ name }}}} inserts a JSON value, quotes included"
            )));
        }
        Ok(rendered.into_bytes())
    }
}

/// Renders `template` once (tests, and where no mapping holds it):
/// [`Templates::render`] of a one-template set.
pub fn render(
    template: &str,
    format: Format,
    fields: Map<String, serde_json::Value>,
    values: &Values,
) -> Result<Vec<u8>, LookupError> {
    Templates::new(vec![("document".into(), template.into(), format)])
        .map_err(|e| LookupError::Internal(format!("the template does not parse: {e}")))?
        .render("document", fields, values)
}

/// The document formats a template can produce, by media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/json` or `+json`: inserted values are JSON-encoded and
    /// the result must parse as JSON.
    Json,
    /// `application/xml`, `text/xml` or `+xml`: inserted values are escaped.
    Xml,
}

impl Format {
    /// The format of `media_type`, if a template can produce it.
    pub fn of(media_type: &str) -> Option<Format> {
        let essence = media_type.split(';').next().unwrap_or("").trim();
        if essence == "application/json" || essence.ends_with("+json") {
            Some(Format::Json)
        } else if essence == "application/xml" || essence == "text/xml" || essence.ends_with("+xml")
        {
            Some(Format::Xml)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, serde_json::Value)]) -> Map<String, serde_json::Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn json_values_are_serialised_so_data_cannot_break_out_of_a_string() {
        let values = Values::new("82281866209", []);
        let doc = render(
            r#"{"name": {{ name }}, "year": {{ year }}, "id": {{ subject }}}"#,
            Format::Json,
            fields(&[
                ("name", "Anna \"},\"admin\":true,{\"x\":\"".into()),
                ("year", 2019.into()),
            ]),
            &values,
        )
        .expect("renders");
        let parsed: serde_json::Value = serde_json::from_slice(&doc).expect("JSON");
        assert_eq!(parsed["name"], "Anna \"},\"admin\":true,{\"x\":\"");
        assert_eq!(parsed["year"], 2019);
        assert_eq!(parsed["id"], "82281866209");
        assert!(parsed.get("admin").is_none());
    }

    #[test]
    fn xml_text_is_escaped() {
        let doc = render(
            "<name>{{ name }}</name>",
            Format::Xml,
            fields(&[("name", "<b>&'\"</b>".into())]),
            &Values::new("x", []),
        )
        .expect("renders");
        let text = String::from_utf8(doc).expect("utf-8");
        assert!(!text.contains("<b>"), "{text}");
        assert!(text.contains("&lt;b&gt;&amp;"), "{text}");
    }

    #[test]
    fn a_missing_field_or_invalid_json_is_an_error_not_a_document() {
        assert!(matches!(
            render(
                "{\"a\": {{ absent }}}",
                Format::Json,
                Map::new(),
                &Values::new("x", [])
            ),
            Err(LookupError::Internal(_))
        ));
        assert!(matches!(
            render(
                "{\"a\": \"{{ subject }}\"}",
                Format::Json,
                Map::new(),
                &Values::new("x", [])
            ),
            Err(LookupError::Internal(_))
        ));
    }
}
