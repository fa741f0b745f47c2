use super::*;

#[test]
fn the_config_space_holds_the_tag_and_one_request_queue() {
    let dir = std::env::temp_dir();
    let fs = Fs::new("microvm", &dir).unwrap();
    let mut tag = [0u8; TAG_LEN];
    fs.read_config(0, &mut tag);
    assert_eq!(&tag[..7], b"microvm");
    assert!(tag[7..].iter().all(|b| *b == 0));
    let mut queues = [0u8; 4];
    fs.read_config(TAG_LEN as u64, &mut queues);
    assert_eq!(u32::from_le_bytes(queues), 1);
    // Reads past the end see zeroes, never a panic.
    let mut beyond = [0xffu8; 8];
    fs.read_config(200, &mut beyond);
    assert_eq!(beyond, [0; 8]);
    assert_eq!(fs.device_type(), VIRTIO_ID_FS);
}

#[test]
fn bad_tags_and_directories_are_named() {
    let dir = std::env::temp_dir();
    assert!(matches!(Fs::new("", &dir), Err(FsError::BadTag(_))));
    let long = "x".repeat(TAG_LEN + 1);
    assert!(matches!(Fs::new(&long, &dir), Err(FsError::BadTag(_))));
    let error = Fs::new("t", Path::new("/no/such/dir"))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("/no/such/dir"), "{error}");
    let file = std::env::current_exe().unwrap();
    let error = Fs::new("t", &file).err().unwrap().to_string();
    assert!(error.contains("not a directory"), "{error}");
}
