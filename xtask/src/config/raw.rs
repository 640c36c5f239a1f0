//! Checks on the config as written, around serde's reading of it: what serde would accept
//! silently (a key the variant does not have, an array where a table belongs, `nan`), what it
//! would report badly (a date, `[[data]]`), and where in the file a key is, so that every error
//! names the line.
//!
//! The document is parsed a second time with `toml_edit` (the parser inside `toml`), which
//! keeps the byte span of every key and value.

use std::ops::Range;

use toml_edit::{ImDocument, Item, Table, Value};

/// A problem at a byte offset of the config.
#[derive(Debug)]
pub struct Located {
    /// Byte offset in the text.
    pub offset: usize,
    /// `key \`path\`: what is wrong`.
    pub message: String,
}

/// One step of a key path: a key, or an index into an array.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

fn path_string(path: &[Step]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Key(k) if s.is_empty() => s.push_str(k),
            Step::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Step::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// A node of the document, whatever TOML syntax wrote it.
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Value(&'a Value),
    Table(&'a Table),
}

/// What a node holds: table entries (name, key span, node), array elements, or a scalar.
enum Shape<'a> {
    Table(Vec<(&'a str, Option<Range<usize>>, Node<'a>)>),
    Array(Vec<Node<'a>>),
    Scalar(&'a Value),
    Empty,
}

impl<'a> Node<'a> {
    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(i) => i.span(),
            Node::Value(v) => v.span(),
            Node::Table(t) => t.span(),
        }
    }

    fn shape(self) -> Shape<'a> {
        let table = |t: &'a Table| {
            Shape::Table(
                t.iter()
                    .filter_map(|(k, _)| t.get_key_value(k))
                    .map(|(k, item)| (k.get(), k.span(), Node::Item(item)))
                    .collect(),
            )
        };
        match self {
            Node::Table(t) => table(t),
            Node::Item(Item::Table(t)) => table(t),
            Node::Item(Item::ArrayOfTables(a)) => Shape::Array(a.iter().map(Node::Table).collect()),
            Node::Item(Item::Value(v)) => Node::Value(v).shape(),
            Node::Item(Item::None) => Shape::Empty,
            Node::Value(Value::InlineTable(t)) => Shape::Table(
                t.iter()
                    .filter_map(|(k, _)| t.get_key_value(k))
                    .map(|(k, item)| (k.get(), k.span(), Node::Item(item)))
                    .collect(),
            ),
            Node::Value(Value::Array(a)) => Shape::Array(a.iter().map(Node::Value).collect()),
            Node::Value(v) => Shape::Scalar(v),
        }
    }

    /// How the node was written, for messages.
    fn written_as(self) -> &'static str {
        match self {
            Node::Item(Item::ArrayOfTables(_)) => "an array of tables `[[…]]`",
            Node::Item(Item::Table(_)) | Node::Table(_) => "a table",
            Node::Item(Item::Value(v)) | Node::Value(v) => match v {
                Value::String(_) => "a string",
                Value::Integer(_) => "an integer",
                Value::Float(_) => "a float",
                Value::Boolean(_) => "a boolean",
                Value::Datetime(_) => "a date-time",
                Value::Array(_) => "an array",
                Value::InlineTable(_) => "a table",
            },
            Node::Item(Item::None) => "nothing",
        }
    }
}

/// The config parsed with spans.
pub struct Document<'a> {
    doc: ImDocument<&'a str>,
}

impl<'a> Document<'a> {
    /// Parses `text`; `None` when it is not TOML (serde's parser reports that, with its place).
    pub fn parse(text: &'a str) -> Option<Self> {
        ImDocument::parse(text).ok().map(|doc| Self { doc })
    }

    fn root(&self) -> Node<'_> {
        Node::Table(self.doc.as_table())
    }

    /// Before serde reads the document: no value anywhere is a date-time or a float that is
    /// not finite (no setting takes either), and the sections have the right shape.
    pub fn check_written_values(&self) -> Result<(), Located> {
        fn walk(node: Node<'_>, path: &mut Vec<Step>, key_span: Option<Range<usize>>) -> Result<(), Located> {
            let at = |span: Option<Range<usize>>| span.or(key_span.clone()).map(|s| s.start).unwrap_or(0);
            match node.shape() {
                Shape::Scalar(Value::Datetime(d)) => Err(Located {
                    offset: at(node.span()),
                    message: format!(
                        "key `{}`: a date-time ({}) is not a valid value for any setting",
                        path_string(path),
                        d.value()
                    ),
                }),
                Shape::Scalar(Value::Float(f)) if !f.value().is_finite() => Err(Located {
                    offset: at(node.span()),
                    message: format!(
                        "key `{}`: {} is not allowed — every number in a config must be finite",
                        path_string(path),
                        f.value()
                    ),
                }),
                Shape::Table(entries) => {
                    for (name, span, child) in entries {
                        path.push(Step::Key(name.to_string()));
                        walk(child, path, span)?;
                        path.pop();
                    }
                    Ok(())
                }
                Shape::Array(items) => {
                    for (i, child) in items.into_iter().enumerate() {
                        path.push(Step::Index(i));
                        walk(child, path, key_span.clone())?;
                        path.pop();
                    }
                    Ok(())
                }
                Shape::Scalar(_) | Shape::Empty => Ok(()),
            }
        }
        walk(self.root(), &mut Vec::new(), None)?;
        // The sections: one table each, and stages as `[[stages]]` tables.
        let Shape::Table(entries) = self.root().shape() else { return Ok(()) };
        for (name, span, node) in entries {
            let table = matches!(node.shape(), Shape::Table(_));
            let wrong = match name {
                "data" | "model" | "latency" | "export" => (!table).then(|| format!("one table `[{name}]`")),
                "stages" => match node.shape() {
                    Shape::Array(items) if items.iter().all(|n| matches!(n.shape(), Shape::Table(_))) => None,
                    _ => Some("tables `[[stages]]`, one per stage".to_string()),
                },
                _ => None,
            };
            if let Some(expected) = wrong {
                return Err(Located {
                    offset: span.map(|s| s.start).unwrap_or(0),
                    message: format!("key `{name}`: expected {expected}, got {}", node.written_as()),
                });
            }
        }
        Ok(())
    }

    /// After serde read the document into `parsed` (the config written back): every key the
    /// text has was read (serde ignores some, such as `width` on a model kind without one),
    /// and no table was written as an array (serde takes a struct's fields in order from one).
    pub fn check_everything_was_read(&self, parsed: &toml::Value) -> Result<(), Located> {
        fn walk(
            node: Node<'_>,
            parsed: &toml::Value,
            path: &mut Vec<Step>,
            key_span: Option<Range<usize>>,
        ) -> Result<(), Located> {
            let at = key_span.clone().or(node.span()).map(|s| s.start).unwrap_or(0);
            match (node.shape(), parsed) {
                (Shape::Table(entries), toml::Value::Table(read)) => {
                    for (name, span, child) in entries {
                        path.push(Step::Key(name.to_string()));
                        let Some(value) = read.get(name) else {
                            let kind = read.get("kind").and_then(|k| k.as_str());
                            let what = kind.map(|k| format!("kind = \"{k}\"")).unwrap_or_else(|| "this table".into());
                            let mut known: Vec<&str> =
                                read.keys().map(|k| k.as_str()).filter(|k| *k != "kind").collect();
                            known.sort_unstable();
                            return Err(Located {
                                offset: span.or(child.span()).map(|s| s.start).unwrap_or(at),
                                message: format!(
                                    "key `{}`: {what} has no setting `{name}`, so it would be ignored{}",
                                    path_string(path),
                                    if known.is_empty() {
                                        " (it takes none)".to_string()
                                    } else {
                                        format!(" (its settings: {})", known.join(", "))
                                    }
                                ),
                            });
                        };
                        walk(child, value, path, span)?;
                        path.pop();
                    }
                    Ok(())
                }
                (Shape::Array(items), toml::Value::Array(read)) => {
                    for (i, (child, value)) in items.into_iter().zip(read).enumerate() {
                        path.push(Step::Index(i));
                        walk(child, value, path, child.span())?;
                        path.pop();
                    }
                    Ok(())
                }
                (Shape::Array(_), toml::Value::Table(_)) => Err(Located {
                    offset: at,
                    message: format!(
                        "key `{}`: expected a table (`{{ key = value, … }}`), got {}: settings are named, not given by position",
                        path_string(path),
                        node.written_as()
                    ),
                }),
                _ => Ok(()),
            }
        }
        walk(self.root(), parsed, &mut Vec::new(), None)
    }

    /// The byte offset of the key a validation message names (`stages[2] (kind =
    /// "prune").sparsity`: the ` (kind = …)` notes are skipped); a key the text leaves out (a
    /// default) is placed at the nearest enclosing key or table that it has. `None` when not
    /// even the first key is in the text.
    pub fn locate(&self, key: &str) -> Option<usize> {
        let mut node = self.root();
        let mut best = None;
        for step in parse_key(key) {
            let found = match (step, node.shape()) {
                (Step::Key(k), Shape::Table(entries)) => {
                    entries.into_iter().find(|(name, _, _)| *name == k).map(|(_, span, child)| (span, child))
                }
                (Step::Index(i), Shape::Array(items)) => items.get(i).map(|child| (child.span(), *child)),
                _ => None,
            };
            let Some((span, child)) = found else { break };
            best = span.or(child.span()).map(|s| s.start).or(best);
            node = child;
        }
        best
    }
}

/// `stages[2] (kind = "prune").overrides[0].pattern` → its steps.
fn parse_key(key: &str) -> Vec<Step> {
    // Drop the notes in parentheses.
    let mut plain = String::new();
    let mut depth = 0;
    for c in key.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ if depth == 0 && c != ' ' => plain.push(c),
            _ => {}
        }
    }
    let mut steps = Vec::new();
    for part in plain.split('.') {
        let mut rest = part;
        if let Some(open) = rest.find('[') {
            if open > 0 {
                steps.push(Step::Key(rest[..open].to_string()));
            }
            rest = &rest[open..];
            while let Some(close) = rest.find(']') {
                if let Ok(i) = rest[1..close].parse() {
                    steps.push(Step::Index(i));
                }
                rest = &rest[close + 1..];
                if !rest.starts_with('[') {
                    break;
                }
            }
        } else if !rest.is_empty() {
            steps.push(Step::Key(rest.to_string()));
        }
    }
    steps
}

/// The first `` key `…` `` a message names (or, in a library's message, `` invalid setting
/// `…` ``).
pub fn key_in_message(message: &str) -> Option<&str> {
    let start =
        ["key `", "invalid setting `"].iter().find_map(|marker| message.find(marker).map(|at| at + marker.len()))?;
    let rest = &message[start..];
    Some(&rest[..rest.find('`')?])
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "name = \"t\"\n[model]\nkind = \"mlp\"\n\n[[stages]]\nkind = \"train\"\noptimizer = { kind = \"sgd\", lr = 0.1 }\n[[stages]]\nkind = \"prune\"\n";

    fn line(text: &str, offset: usize) -> usize {
        text[..offset].matches('\n').count() + 1
    }

    #[test]
    fn keys_are_located_and_defaults_fall_back_to_their_table() {
        let doc = Document::parse(TEXT).unwrap();
        let at = |k: &str| doc.locate(k).map(|o| line(TEXT, o));
        assert_eq!(at("model.kind"), Some(3));
        assert_eq!(at("stages[0] (kind = \"train\").optimizer.lr"), Some(7));
        assert_eq!(at("stages[1] (kind = \"prune\").sparsity"), Some(8));
        assert_eq!(at("latency"), None);
        assert_eq!(key_in_message("x: key `a.b` / `c`: bad"), Some("a.b"));
        assert_eq!(key_in_message("invalid setting `model.mean`: bad"), Some("model.mean"));
    }

    #[test]
    fn dates_non_finite_numbers_and_wrong_sections_are_refused() {
        for (text, expected) in [
            ("[model]\nkind = \"mlp\"\nhidden = [1979-05-27]\n", "key `model.hidden[0]`: a date-time"),
            (
                "[[stages]]\nkind = \"train\"\noptimizer = { kind = \"sgd\", lr = nan }\n",
                "stages[0].optimizer.lr`: NaN is not allowed",
            ),
            ("[[data]]\nkind = \"mnist5k\"\n", "key `data`: expected one table `[data]`, got an array of tables"),
            ("stages = 3\n", "key `stages`: expected tables `[[stages]]`"),
        ] {
            let doc = Document::parse(text).unwrap();
            let e = doc.check_written_values().unwrap_err();
            assert!(e.message.contains(expected), "{text}: {e:?}");
        }
    }

    #[test]
    fn ignored_keys_and_positional_tables_are_refused() {
        let read = |text: &str| toml::from_str::<toml::Value>(text).unwrap();
        let text = "[model]\nkind = \"lenet5\"\nwidth = 2\n";
        let e = Document::parse(text).unwrap().check_everything_was_read(&read("[model]\nkind = \"lenet5\"\n"));
        let e = e.unwrap_err();
        assert!(e.message.contains("key `model.width`: kind = \"lenet5\" has no setting `width`"), "{e:?}");
        assert_eq!(line(text, e.offset), 3);
        let text = "optimizer = [\"adam\", 0.003]\n";
        let e = Document::parse(text)
            .unwrap()
            .check_everything_was_read(&read("optimizer = { kind = \"adam\", lr = 0.003 }\n"))
            .unwrap_err();
        assert!(e.message.contains("key `optimizer`: expected a table"), "{e:?}");
        // Everything read: fine.
        let text = "[model]\nkind = \"mlp\"\nhidden = [8]\n";
        assert!(Document::parse(text).unwrap().check_everything_was_read(&read(text)).is_ok());
    }
}
