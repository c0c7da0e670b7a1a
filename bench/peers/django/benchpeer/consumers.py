"""The demo contract: /ws/echo/ echoes verbatim, /ws/chat/{room}/ broadcasts verbatim to every
member of the room, the sender included (a group_send through the channel layer)."""

from channels.generic.websocket import AsyncWebsocketConsumer


class EchoConsumer(AsyncWebsocketConsumer):
    async def receive(self, text_data=None, bytes_data=None):
        await self.send(text_data=text_data, bytes_data=bytes_data)


class ChatConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        self.group = "chat." + self.scope["url_route"]["kwargs"]["room"]
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        await self.channel_layer.group_send(
            self.group, {"type": "chat.message", "text": text_data, "bytes": bytes_data}
        )

    async def chat_message(self, event):
        await self.send(text_data=event["text"], bytes_data=event["bytes"])
