def test_micro_run_has_model_and_queries(micro_run):
    tensors, meta = micro_run.load_samples("queries")
    assert tensors["images"].shape == (3, 1, 8, 8)
    assert tensors["trajectory"].shape == (1001, 3, 1, 8, 8)
    assert micro_run.has_model()
