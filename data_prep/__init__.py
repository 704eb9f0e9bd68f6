"""Pack image corpora into verified webdataset shards."""
