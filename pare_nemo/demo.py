def demo(workdir: str = "pare_demo") -> None:
    """stub"""
