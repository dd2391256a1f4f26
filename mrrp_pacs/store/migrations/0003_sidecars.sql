-- Region sidecar files that arrive next to images: ASAP XML and QuPath GeoJSON (slide tumour
-- regions), LabelImg / Pascal-VOC XML (ultrasound lesion boxes). They carry no patient
-- identity: they are linked to an image by a UID in their file name, or by the folder they
-- came in (and, for VOC, the image file name they name).

CREATE TABLE sidecars (
    id               INTEGER PRIMARY KEY,
    kind             TEXT NOT NULL,              -- asap | geojson | voc
    sha256           TEXT NOT NULL UNIQUE,
    size_bytes       INTEGER NOT NULL,
    source           TEXT NOT NULL,              -- file:<path>
    folder           TEXT,                       -- folder it was dropped in
    stem             TEXT NOT NULL,              -- file name without extension
    image_file_name  TEXT,                       -- VOC <filename>
    received_at      TEXT NOT NULL
);
CREATE INDEX sidecars_stem ON sidecars(stem);
CREATE INDEX sidecars_folder ON sidecars(folder);
