//! A file of our own mapped into memory: an image folder's decoded images, which the OS pages in
//! as batches read them (and out under memory pressure) instead of the heap holding them all.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Error, Result};

/// A read-only mapping of a file this process wrote and unlinked.
pub(crate) struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map
    }
}

/// Writes bytes to an anonymous temporary file, then maps it.
pub(crate) struct MappedWriter {
    file: BufWriter<File>,
    path: PathBuf,
    written: u64,
}

impl MappedWriter {
    /// A new file in the system's temporary directory, unlinked at once: it disappears with the
    /// process, whatever happens, and no other program can open it by name.
    pub(crate) fn new(purpose: &str) -> Result<Self> {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("shrink-{purpose}-{}-{n}.bin", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Self { file: BufWriter::new(file), path, written: 0 })
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.written += bytes.len() as u64;
        self.file.write_all(bytes).map_err(|e| Error::io(&self.path, e))
    }

    /// Maps what was written.
    pub(crate) fn finish(self) -> Result<MappedFile> {
        let path: &Path = &self.path;
        let file = self.file.into_inner().map_err(|e| Error::io(path, e.into_error()))?;
        // SAFETY: memmap2 requires that the file not change while it is mapped. This process
        // created it under a fresh name, unlinked it before writing, and never writes it again;
        // no other program can open it by name (only through this process's /proc/<pid>/fd).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        debug_assert_eq!(map.len() as u64, self.written);
        Ok(MappedFile { map })
    }
}
