//! Helpers shared by the fuzz targets: a Landlock jail for targets that write files
//! ([`sandbox`]), and a slow reference of udev's matching to compare the real matcher with
//! ([`reference`]).

pub mod reference;
pub mod sandbox;

/// Where targets that write trees work: /dev/shm (memory) when there is one, since a disk
/// file system makes those targets ten times slower; the temporary directory otherwise.
pub fn scratch_dir() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() { shm.to_owned() } else { std::env::temp_dir() }
}
