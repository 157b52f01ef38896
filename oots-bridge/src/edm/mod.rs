//! The EU OOTS Evidence Data Model (EDM 2.0, ebRS/RegRep 4 XML): what an
//! evidence request says ([`request`]), how the bridge answers it
//! ([`response`]), and its error codes ([`error`]).
//!
//! Elements and slots are found by namespace URI and local name, never by
//! prefix or position: prefixes are whatever the sender chose. Documents
//! are read with `roxmltree` with DTDs refused (no entity can expand), a
//! size cap before parsing, a cap on nodes, on nesting depth and on the
//! length of any one attribute or text: hostile XML is refused before it
//! costs memory.

pub mod error;
pub mod request;
pub mod response;

pub use error::{EdmError, ErrorCode};
pub use request::QueryRequest;

/// `query:` (RegRep 4 queries).
pub const NS_QUERY: &str = "urn:oasis:names:tc:ebxml-regrep:xsd:query:4.0";
/// `rs:` (RegRep 4 registry services: responses, exceptions).
pub const NS_RS: &str = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:4.0";
/// `rim:` (RegRep 4 information model: slots, objects).
pub const NS_RIM: &str = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:4.0";
/// `sdg:` (the OOTS EDM's own types).
pub const NS_SDG: &str = "http://data.europa.eu/p4s";
/// `xsi:`.
pub const NS_XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";
/// `xlink:`.
pub const NS_XLINK: &str = "http://www.w3.org/1999/xlink";

/// The EDM version the bridge speaks.
pub const SPECIFICATION: &str = "oots-edm:v2.0";

/// Limits on what the bridge reads.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest document, in bytes.
    pub max_bytes: usize,
    /// The most nodes (elements, texts, attributes' owners).
    pub max_nodes: u32,
    /// The deepest nesting of elements.
    pub max_depth: usize,
    /// The longest attribute value or text, in bytes.
    pub max_value: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 1024 * 1024,
            max_nodes: 20_000,
            max_depth: 40,
            max_value: 16 * 1024,
        }
    }
}

/// Parses `xml` within `limits`: the document, or EDM:ERR:0003 naming
/// what was refused.
pub fn parse<'a>(xml: &'a str, limits: &Limits) -> Result<roxmltree::Document<'a>, EdmError> {
    if xml.len() > limits.max_bytes {
        return Err(EdmError::invalid(
            "R-BRIDGE-SIZE",
            format!(
                "the document is {} bytes; at most {} are read",
                xml.len(),
                limits.max_bytes
            ),
        ));
    }
    // roxmltree builds its tree recursively: depth is bounded before it
    // reads anything.
    if nesting_exceeds(xml, limits.max_depth) {
        return Err(EdmError::invalid(
            "R-BRIDGE-DEPTH",
            format!("elements nest deeper than {}", limits.max_depth),
        ));
    }
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: limits.max_nodes,
    };
    let document = roxmltree::Document::parse_with_options(xml, options).map_err(|e| {
        let rule = match e {
            roxmltree::Error::DtdDetected => "R-BRIDGE-DTD",
            roxmltree::Error::NodesLimitReached => "R-BRIDGE-NODES",
            _ => "R-BRIDGE-XML",
        };
        EdmError::invalid(rule, format!("not a well-formed EDM document: {e}"))
    })?;
    // Depth and value sizes, without recursion.
    let mut stack = vec![(document.root(), 0usize)];
    while let Some((node, depth)) = stack.pop() {
        if depth > limits.max_depth {
            return Err(EdmError::invalid(
                "R-BRIDGE-DEPTH",
                format!("elements nest deeper than {}", limits.max_depth),
            ));
        }
        if node.text().is_some_and(|t| t.len() > limits.max_value)
            || node
                .attributes()
                .any(|a| a.value().len() > limits.max_value)
        {
            return Err(EdmError::invalid(
                "R-BRIDGE-VALUE",
                format!(
                    "a text or attribute value is longer than {} bytes",
                    limits.max_value
                ),
            ));
        }
        stack.extend(node.children().map(|child| (child, depth + 1)));
    }
    Ok(document)
}

/// Whether elements in `xml` nest deeper than `max`: a scan of the tags
/// alone (comments, CDATA, processing instructions and declarations
/// skipped; quoted attribute values respected), in constant memory.
fn nesting_exceeds(xml: &str, max: usize) -> bool {
    let bytes = xml.as_bytes();
    let mut depth = 0usize;
    let mut at = 0;
    let skip_past = |from: usize, end: &[u8]| -> usize {
        bytes[from..]
            .windows(end.len())
            .position(|w| w == end)
            .map_or(bytes.len(), |p| from + p + end.len())
    };
    while let Some(offset) = bytes[at..].iter().position(|&b| b == b'<') {
        let start = at + offset;
        let rest = &bytes[start + 1..];
        if rest.starts_with(b"!--") {
            at = skip_past(start, b"-->");
        } else if rest.starts_with(b"![CDATA[") {
            at = skip_past(start, b"]]>");
        } else if rest.starts_with(b"?") {
            at = skip_past(start, b"?>");
        } else if rest.starts_with(b"!") {
            at = skip_past(start, b">");
        } else if rest.starts_with(b"/") {
            depth = depth.saturating_sub(1);
            at = skip_past(start, b">");
        } else {
            // A start tag: to its '>', outside quotes.
            let mut quote = None;
            let mut end = start + 1;
            while end < bytes.len() {
                match (bytes[end], quote) {
                    (b'"' | b'\'', None) => quote = Some(bytes[end]),
                    (q, Some(open)) if q == open => quote = None,
                    (b'>', None) => break,
                    _ => {}
                }
                end += 1;
            }
            if end > 0 && end < bytes.len() && bytes[end - 1] != b'/' {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            at = end.saturating_add(1).min(bytes.len());
        }
        if at >= bytes.len() {
            break;
        }
    }
    false
}

/// Escapes text for XML (one implementation for the project).
pub use onceonly_proto::xml::escape;

#[cfg(test)]
mod tests {
    use super::nesting_exceeds;

    #[test]
    fn nesting_is_counted_on_tags_alone() {
        assert!(!nesting_exceeds("<a><b/><c></c></a>", 2));
        assert!(nesting_exceeds("<a><b><c></c></b></a>", 2));
        // Comments, CDATA, declarations and quoted '>' are not tags.
        assert!(!nesting_exceeds(
            r#"<?xml version="1.0"?><!-- <x><y><z> --><a t="<b><c>"><![CDATA[<d><e>]]></a>"#,
            1
        ));
        // Self-closing tags with attributes do not nest.
        assert!(!nesting_exceeds(r#"<a><b x="1" /><b y='/>'/></a>"#, 1));
        // Unterminated input ends the scan.
        assert!(!nesting_exceeds("<a", 1));
        assert!(nesting_exceeds(&"<a>".repeat(50), 40));
    }
}
