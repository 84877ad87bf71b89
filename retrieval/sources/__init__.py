"""Where items come from: finding image files, reading caption and pairs files, decoding images, and the item types
(stable ids, skipped-item records) they yield."""
