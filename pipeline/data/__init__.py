"""Data: dataset readers, the synthetic generator, the record schema, preparation and augmentation."""
