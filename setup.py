"""Packaging for nbs_lib: every field comes from settings.ini, nbdev's single source."""

from configparser import ConfigParser

import setuptools

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    author=cfg["author"],
    author_email=cfg["author_email"],
    license="Apache-2.0",
    keywords=cfg["keywords"].split(),
    python_requires=f">={cfg['min_python']}",
    packages=setuptools.find_packages(include=[f"{cfg['lib_path']}*"]),
    install_requires=cfg["requirements"].split(),
    extras_require={key.removeprefix("extras_"): value.split() for key, value in cfg.items() if key.startswith("extras_")},
    entry_points={
        "console_scripts": cfg["console_scripts"].split(),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
        "papermill.engine": cfg["papermill_engines"].split(),
        "jupyter_client.kernel_provisioners": cfg["kernel_provisioners"].split(),
    },
    zip_safe=False,
)
