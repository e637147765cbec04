from setuptools import find_packages, setup

setup(
    name="lightning_pieg",
    version="0.1.0",
    description="PIE-G (pre-trained image encoder for generalizable visual RL) on PyTorch Lightning",
    packages=find_packages(include=["lightning_pieg", "lightning_pieg.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch/torchvision: pinned to the pair that matches this project's tested stack
        "torch==2.14.1",
        "torchvision==0.29.1",
        "pytorch-lightning>=2.4,<3",
        "torchmetrics>=1.4",
        "hydra-core>=1.3,<1.4",
        "mlflow>=3.0",
        "dm_control==1.0.50",
        "mujoco==3.17.0",  # dm_control 1.0.50 breaks on mujoco 4.0 (flex_vertedge)
        "av>=12",
        "matplotlib>=3.7",
        "numpy>=1.24",
        "rliable==1.2.0",  # seed statistics (lightning_pieg/stats.py)
        "pandas<3",        # rliable pins arch < 8, which does not import under pandas 3
    ],
    extras_require={
        # Drawer World (task drawer_close) needs Meta-World; the suite and reach_duplo do not
        "drawerworld": ["metaworld>=3.0,<4"],
        "test": ["pytest>=8", "metaworld>=3.0,<4"],
    },
    package_data={"lightning_pieg": ["paper/*.csv", "paper/README.md", "paper/drqv2_curves/*.csv",
                                     "paper/drqv2_curves/LICENSE"]},
    entry_points={"console_scripts": [
        "pieg-train=lightning_pieg.train:main",
        "pieg-evaluate=lightning_pieg.evaluate:main",
    ]},
)
