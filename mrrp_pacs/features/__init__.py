"""Feature extraction: the list of families (``families``), a module per family or step (wsi,
nuclei, morphology, topology, us_image, us_roi, us_encoder, radiomics, text, clinical), the
encoder registries, and the ``pipeline`` that runs them. Results are cached in the store by
(patient, family, extractor name + version, input hash)."""
