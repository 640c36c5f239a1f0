//! Image folders: `root/<class>/<image>.{png,jpg,jpeg}`, classes in alphabetical order, as
//! torchvision's `ImageFolder`.

use std::path::{Path, PathBuf};

use super::Dataset;
use crate::{Error, Result};

/// Loads every PNG or JPEG under `root/<class>/`, resized to `size` (height, width) and turned
/// into `channels` (1 = grey, 3 = RGB).
///
/// # Errors
/// [`Error::Io`] for an unreadable folder, [`Error::BadFile`] for an image that cannot be
/// decoded (naming it), [`Error::InvalidSetting`] for a folder with no class or no image or a
/// channel count other than 1 or 3.
pub fn load_image_folder(root: &Path, size: [usize; 2], channels: usize) -> Result<Dataset> {
    if channels != 1 && channels != 3 {
        return Err(Error::setting("data.channels", format!("expected 1 or 3, got {channels}")));
    }
    if size.contains(&0) {
        return Err(Error::setting("data.size", "height and width must be positive"));
    }
    let mut classes: Vec<(String, PathBuf)> = read_dir(root)?
        .into_iter()
        .filter(|p| p.is_dir())
        .map(|p| (p.file_name().unwrap_or_default().to_string_lossy().into_owned(), p))
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(Error::setting("data.path", format!("{}: no class folders", root.display())));
    }
    let mut listed = Vec::with_capacity(classes.len());
    for (_, dir) in &classes {
        let mut files: Vec<PathBuf> = read_dir(dir)?
            .into_iter()
            .filter(|p| {
                let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
                matches!(ext.as_str(), "png" | "jpg" | "jpeg")
            })
            .collect();
        files.sort();
        listed.push(files);
    }
    // Each file is decoded, resized and appended to a temporary file, and dropped before the
    // next is read; the dataset maps that file, so the OS pages images in as batches need them
    // and the heap never holds the set: a folder larger than memory still loads.
    let mut out = super::mapped::MappedWriter::new("images")?;
    let mut labels = Vec::new();
    for (label, files) in listed.into_iter().enumerate() {
        for file in files {
            let img = image::open(&file).map_err(|e| Error::bad_file(&file, 0, format!("cannot decode image: {e}")))?;
            let img = img.resize_exact(size[1] as u32, size[0] as u32, image::imageops::FilterType::Triangle);
            if channels == 1 {
                out.write(img.to_luma8().as_raw())?;
            } else {
                // HWC -> CHW.
                let rgb = img.to_rgb8();
                let raw = rgb.as_raw();
                let planes: Vec<u8> = (0..3).flat_map(|c| raw.iter().skip(c).step_by(3).copied()).collect();
                out.write(&planes)?;
            }
            labels.push(label as u32);
        }
    }
    if labels.is_empty() {
        return Err(Error::setting("data.path", format!("{}: no PNG or JPEG images", root.display())));
    }
    let storage = super::Storage::Mapped(std::sync::Arc::new(out.finish()?));
    let mut d = Dataset::with_storage([channels, size[0], size[1]], storage, labels, classes.len())?;
    d.class_names = classes.into_iter().map(|(n, _)| n).collect();
    Ok(d)
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    entries.map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_classes_in_order_and_channel_major() {
        let root = super::super::idx::tests::tempdir().join("folder");
        for (class, colour) in [("b_red", [255u8, 0, 0]), ("a_blue", [0, 0, 255])] {
            std::fs::create_dir_all(root.join(class)).unwrap();
            let img = image::RgbImage::from_pixel(4, 2, image::Rgb(colour));
            img.save(root.join(class).join("x.png")).unwrap();
        }
        std::fs::write(root.join("a_blue").join("notes.txt"), "ignored").unwrap();
        let d = load_image_folder(&root, [2, 4], 3).unwrap();
        assert_eq!(d.class_names, vec!["a_blue", "b_red"]);
        assert_eq!(d.labels, vec![0, 1]);
        assert_eq!(d.shape, [3, 2, 4]);
        // Blue image: red plane 0, blue plane 255.
        assert!(d.is_mapped());
        assert_eq!(&d.image(0)[0..8], &[0; 8]);
        assert_eq!(&d.image(0)[16..24], &[255; 8]);
        // Subsets and splits share the mapping.
        let (t, v) = d.split(0.5, 3).unwrap();
        assert!(t.is_mapped() && v.is_mapped());
        let mut both = vec![t.image(0).to_vec(), v.image(0).to_vec()];
        both.sort();
        assert_eq!(both, vec![d.image(0).to_vec(), d.image(1).to_vec()]);

        std::fs::write(root.join("a_blue").join("broken.png"), b"not a png").unwrap();
        let e = load_image_folder(&root, [2, 4], 3).unwrap_err().to_string();
        assert!(e.contains("broken.png"), "{e}");
        let _ = std::fs::remove_dir_all(root.parent().unwrap());
    }
}
