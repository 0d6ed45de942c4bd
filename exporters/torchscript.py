def export_torchscript(*a, **k): raise NotImplementedError
