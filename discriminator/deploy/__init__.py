"""Deployment, apart from training: export a checkpoint's inference graph to ONNX / OpenVINO
(`export`) and run any of the three forms behind one interface (`inferencers`)."""
