//! The image-folder loader streams: its heap stays far below the size of the decoded set,
//! checked with a global allocator that tracks the live bytes and their peak.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Tracking;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only tracks sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(live, Ordering::SeqCst);
        // SAFETY: the caller's layout, passed on as `GlobalAlloc::alloc` received it.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: `ptr` came from `System.alloc` with this layout (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

// One test: the counters are global, and tests in one binary run in parallel.
#[test]
fn an_image_folder_loads_without_holding_its_images_on_the_heap() {
    let root = std::env::temp_dir().join(format!("shrink-data-alloc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (classes, per_class, side) = (2, 60, 64);
    for c in 0..classes {
        let dir = root.join(format!("class{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let img =
                image::RgbImage::from_fn(48, 48, |x, y| image::Rgb([(x * 5) as u8, (y * 5) as u8, (i * 4 + c) as u8]));
            img.save(dir.join(format!("{i:03}.png"))).unwrap();
        }
    }
    let decoded = classes * per_class * 3 * side * side; // 1.47 MB at 3×64×64
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let data = shrink_core::data::load_image_folder(&root, [side, side], 3).unwrap();
    let peak = PEAK.load(Ordering::SeqCst) - before;
    let kept = LIVE.load(Ordering::SeqCst) - before;
    std::fs::remove_dir_all(&root).unwrap();

    assert_eq!(data.len(), classes * per_class);
    assert!(data.is_mapped());
    // Every image is there: the last one's blue plane carries its index and class.
    let last = data.image(data.len() - 1);
    assert_eq!(last[2 * side * side], ((per_class - 1) * 4 + 1) as u8);
    assert!(peak < decoded / 4, "peak heap while loading {peak} bytes, decoded set {decoded} bytes");
    assert!(kept < decoded / 20, "heap kept after loading {kept} bytes, decoded set {decoded} bytes");
}
