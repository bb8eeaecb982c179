//! The errors of the `sdpa` command. Each prints as one line that says what
//! was wrong and, where it can, what to change.

use std::path::PathBuf;

use sdpa_runtime::SdpaError;

/// Everything a subcommand can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The attention runtime refused the call; its message says what to
    /// change.
    #[error(transparent)]
    Sdpa(#[from] SdpaError),
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file is not valid safetensors.
    #[error("{} is not a valid safetensors file: {source}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What the safetensors parser said.
        source: safetensors::SafeTensorError,
    },
    /// The `--compare` file is not torch's results as `sdpa bench --plot`
    /// reads them.
    #[error(
        "{} is not a torch results JSON (an array of objects with shape \"BxHqxSqxSkxD\", \
         backend and tflops): {reason}",
        path.display()
    )]
    Compare {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The input case holds something `sdpa run` cannot use.
    #[error("{0}")]
    Input(String),
    /// The command-line flags do not fit together.
    #[error("{0}")]
    Usage(String),
}

/// `Result` with [`CliError`].
pub type Result<T, E = CliError> = std::result::Result<T, E>;
