//! Layered generations: a generation frozen while clones of an earlier one
//! still map the parent's RAM file cannot be written into that file. It is
//! the file (the *base*, unchanged) plus a *layer*: a sparse file of the
//! guest's size (`top`) holding the pages that differ from the base, and a
//! map (`top.map`, one bit per page) of the pages that come from it. A
//! page of the map that is a hole in `top` is a zero page (the guest freed
//! it). Nothing is copied but the differing pages; every layer sits on the
//! base itself, never on another layer.
//!
//! May import: [`super`] (errors, [`Frozen`]), `extents.rs`,
//! `precopy.rs` (a file's own holes), the crate root.

use super::extents::page_extents;
use super::precopy::frozen_in_place;
use super::{FreezeError, Frozen};
use crate::PAGE_SIZE;
use bitvec::prelude::*;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// File name of a layer's pages, in its generation's directory.
pub const TOP: &str = "top";
/// File name of a layer's map, in its generation's directory.
pub const TOP_MAP: &str = "top.map";

/// A generation's layer over its base; see the module docs.
#[derive(Debug)]
pub struct Layer {
    pub top: File,
    /// One bit per page of the generation: set where the page is the
    /// top's (data, or a zero page where the top has a hole).
    pub map: BitVec<u64, Lsb0>,
}

/// Writes a page map: one bit per page, least significant bit first.
pub fn save_map(path: &Path, bits: &BitVec<u64, Lsb0>) -> io::Result<()> {
    let bytes: BitVec<u8, Lsb0> = bits.iter().by_vals().collect();
    std::fs::write(path, bytes.as_raw_slice())
}

/// Reads a page map written by [`save_map`], as `pages` bits (a short file
/// reads as zeros past its end, extra bytes are ignored).
pub fn load_map(path: &Path, pages: usize) -> io::Result<BitVec<u64, Lsb0>> {
    let bytes = std::fs::read(path)?;
    let mut bits = bitvec![u64, Lsb0; 0; pages];
    for (i, b) in BitVec::<u8, Lsb0>::from_vec(bytes)
        .iter()
        .by_vals()
        .take(pages)
        .enumerate()
    {
        bits.set(i, b);
    }
    Ok(bits)
}

impl Layer {
    /// The layer of the generation in `dir` of `pages` pages, if it has
    /// one (`None`: the generation is its base alone).
    pub fn open(dir: &Path, pages: usize) -> io::Result<Option<Layer>> {
        let top = match File::open(dir.join(TOP)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let map = load_map(&dir.join(TOP_MAP), pages)?;
        Ok(Some(Layer { top, map }))
    }

    /// Overlays the layer's pages on `buf`, which holds the base's pages
    /// from page `first` on: the generation's contents.
    pub fn overlay(&self, first: u64, buf: &mut [u8]) -> io::Result<()> {
        let page = PAGE_SIZE as usize;
        let a = (first as usize).min(self.map.len());
        let b = (a + buf.len() / page).min(self.map.len());
        let mut ones = self.map[a..b].iter_ones().peekable();
        while let Some(i) = ones.next() {
            let mut j = i;
            while ones.peek() == Some(&(j + 1)) {
                j += 1;
                ones.next();
            }
            let dst = &mut buf[i * page..(j + 1) * page];
            self.top.read_exact_at(dst, (a + i) as u64 * PAGE_SIZE)?;
        }
        Ok(())
    }

    /// The pages of the map that hold data in the top (not zero pages):
    /// what a VMM mapping the base must be given to see the generation.
    pub fn data_pages(&self) -> io::Result<BitVec<u64, Lsb0>> {
        let size = self.map.len() as u64 * PAGE_SIZE;
        let mut data = bitvec![u64, Lsb0; 0; self.map.len()];
        for (a, b) in page_extents(&self.top, size)? {
            data[a as usize..b as usize].fill(true);
        }
        data &= &self.map;
        Ok(data)
    }
}

/// Describes the generation `base` + the layer in `dir` (its holes: the
/// base's outside the map, the top's inside it). `fixed` is what the
/// caller wrote into the layer while the VM was paused.
pub fn frozen_layered(base: &Path, dir: &Path, fixed: u64) -> Result<Frozen, FreezeError> {
    let mut fr = frozen_in_place(base, fixed)?;
    let top_path = dir.join(TOP);
    let serr = |err| FreezeError::Source {
        path: top_path.display().to_string(),
        err,
    };
    if let Some(layer) = Layer::open(dir, fr.holes.len()).map_err(serr)? {
        let data = layer.data_pages().map_err(serr)?;
        // In the map: a hole exactly where the top has none.
        let in_map_holes = layer.map.clone() & !data;
        fr.holes &= !layer.map;
        fr.holes |= in_map_holes;
        fr.copied = (fr.holes.len() - fr.holes.count_ones()) as u64 * PAGE_SIZE;
    }
    Ok(fr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_of(buf: &[u8], p: usize) -> &[u8] {
        &buf[p * 4096..(p + 1) * 4096]
    }

    /// A base of 8 pages (page p holds p + 1, page 6 a hole) and a layer
    /// with page 2 changed (to 42) and page 3 freed (a hole in the map).
    fn sample(dir: &Path) -> std::path::PathBuf {
        let base = dir.join("ram");
        let f = File::create(&base).unwrap();
        f.set_len(8 * PAGE_SIZE).unwrap();
        for p in (0..8).filter(|p| *p != 6) {
            f.write_all_at(&[p as u8 + 1; 4096], p * PAGE_SIZE).unwrap();
        }
        let top = File::create(dir.join(TOP)).unwrap();
        top.set_len(8 * PAGE_SIZE).unwrap();
        top.write_all_at(&[42; 4096], 2 * PAGE_SIZE).unwrap();
        let mut map = bitvec![u64, Lsb0; 0; 8];
        map.set(2, true);
        map.set(3, true);
        save_map(&dir.join(TOP_MAP), &map).unwrap();
        base
    }

    #[test]
    fn maps_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let mut bits = bitvec![u64, Lsb0; 0; 70];
        for i in [0, 9, 63, 64, 69] {
            bits.set(i, true);
        }
        save_map(&p, &bits).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 9);
        assert_eq!(load_map(&p, 70).unwrap(), bits);
        // Short or long files: zeros past the end, extra ignored.
        let short = load_map(&p, 100).unwrap();
        assert_eq!(short.count_ones(), 5);
        assert_eq!(
            load_map(&p, 10).unwrap().iter_ones().collect::<Vec<_>>(),
            [0, 9]
        );
    }

    #[test]
    fn a_layer_overlays_its_pages_and_its_zero_pages() {
        let dir = tempfile::tempdir().unwrap();
        let base = sample(dir.path());
        let layer = Layer::open(dir.path(), 8).unwrap().unwrap();
        let mut buf = std::fs::read(&base).unwrap();
        layer.overlay(0, &mut buf).unwrap();
        assert!(page_of(&buf, 2).iter().all(|b| *b == 42));
        assert!(page_of(&buf, 3).iter().all(|b| *b == 0));
        assert!(page_of(&buf, 4).iter().all(|b| *b == 5));
        // A window: pages 3..5 only.
        let mut w = std::fs::read(&base).unwrap()[3 * 4096..5 * 4096].to_vec();
        layer.overlay(3, &mut w).unwrap();
        assert!(page_of(&w, 0).iter().all(|b| *b == 0));
        assert!(page_of(&w, 1).iter().all(|b| *b == 5));
        assert_eq!(
            layer.data_pages().unwrap().iter_ones().collect::<Vec<_>>(),
            [2]
        );
    }

    #[test]
    fn a_layered_generation_has_the_right_holes() {
        let dir = tempfile::tempdir().unwrap();
        let base = sample(dir.path());
        let fr = frozen_layered(&base, dir.path(), 4096).unwrap();
        assert_eq!(fr.holes.iter_ones().collect::<Vec<_>>(), [3, 6]);
        assert_eq!((fr.copied, fr.fixed), (6 * PAGE_SIZE, 4096));
        // Without a layer: the base's holes.
        let plain = tempfile::tempdir().unwrap();
        let fr = frozen_layered(&base, plain.path(), 0).unwrap();
        assert_eq!(fr.holes.iter_ones().collect::<Vec<_>>(), [6]);
        assert!(Layer::open(plain.path(), 8).unwrap().is_none());
    }
}
