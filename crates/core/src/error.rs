//! The error type of shrink-core.

use std::path::PathBuf;

/// Everything that can go wrong in shrink-core.
///
/// Errors about input (a data file, a model file, a graph description) say which file and
/// where; errors about a run say what failed. Nothing in shrink-core panics on bad input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A backend name that shrink does not know.
    #[error("unknown backend `{0}`: expected one of flex, ndarray, wgpu")]
    UnknownBackend(String),
    /// The backend exists but this build does not contain it.
    #[error(
        "backend `{backend}` is not compiled into this build: enable the cargo feature `{feature}` (e.g. `cargo xtask-{feature}` or `--features {feature}`)"
    )]
    BackendNotCompiled {
        /// The backend asked for.
        backend: &'static str,
        /// The cargo feature that compiles it in.
        feature: &'static str,
    },
    /// A graph that is not well formed: a bad edge, a shape that does not fit, a duplicate name.
    #[error("invalid graph: node `{node}`: {message}")]
    InvalidGraph {
        /// The node at fault.
        node: String,
        /// What is wrong with it.
        message: String,
    },
    /// A node name that is not in the graph.
    #[error("no node named `{0}` in the graph")]
    UnknownNode(String),
    /// An input tensor whose shape the graph cannot take.
    #[error("input shape {got:?} does not match the graph input [batch, {expected:?}]")]
    InputShape {
        /// Shape given.
        got: Vec<usize>,
        /// `[channels, height, width]` the graph expects.
        expected: [usize; 3],
    },
    /// A data or model file that cannot be parsed.
    #[error("{}: byte {offset}: {message}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// Byte offset of the problem (0 when it concerns the whole file).
        offset: u64,
        /// What was expected and what was found.
        message: String,
    },
    /// An ONNX model that cannot be imported: the file, and every node at fault with its op.
    #[error("{}: {message}", path.display())]
    Onnx {
        /// The model file.
        path: PathBuf,
        /// What is wrong, node by node.
        message: String,
    },
    /// An I/O error on a file. The OS error is part of the message and not a `source`, so
    /// that a chain of errors prints it once.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// A setting outside its valid range.
    #[error("invalid setting `{key}`: {message}")]
    InvalidSetting {
        /// The setting.
        key: String,
        /// What was expected.
        message: String,
    },
    /// A training or evaluation run that could not go on (for example a NaN loss).
    #[error("run failed: {0}")]
    RunFailed(String),
    /// A tensor could not be read back to the host (a backend error, or values that do not
    /// convert to the type asked for); see [`crate::host`].
    #[error("reading a tensor back to the host failed: {0}")]
    TensorRead(String),
}

impl Error {
    pub(crate) fn graph(node: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidGraph { node: node.into(), message: message.into() }
    }

    pub(crate) fn bad_file(path: impl Into<PathBuf>, offset: u64, message: impl Into<String>) -> Self {
        Error::BadFile { path: path.into(), offset, message: message.into() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), error: source }
    }

    pub(crate) fn setting(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidSetting { key: key.into(), message: message.into() }
    }
}

/// Result with shrink-core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
